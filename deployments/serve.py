"""Serve the flows as deployments without a work pool: `python -m deployments.serve`.

Needs a Prefect server (`prefect server start`, PREFECT_API_URL set). Runs started from the
UI, a schedule or the REST API then execute under this process, each in a subprocess that
loads its flow from the entrypoint recorded here.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import serve

from flows.recipe import method_flow, recipe_flow
from tasks.core.methods import METHODS

REPO = Path(__file__).resolve().parent.parent


def deployments() -> list:
    """One deployment per flow. The method flows are the lifecycle flow under other names
    (`lifecycle.with_options`), so Prefect would record `flows/lifecycle.py:lifecycle` as their
    entrypoint, which loads the flow under the wrong name; each gets the module variable
    prefect.yaml declares instead."""
    found = []
    for method in METHODS:
        deployment = method_flow(method).to_deployment(name=method, tags=["finetune", method])
        deployment.entrypoint = f"flows/{method}.py:{method}"
        found.append(deployment)
    recipe = recipe_flow.to_deployment(name="recipe", tags=["finetune", "recipe"])
    recipe.entrypoint = "flows/recipe.py:recipe_flow"
    found.append(recipe)
    return found


def main() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.chdir(REPO)  # entrypoints and relative dataset paths are relative to the checkout
    serve(*deployments())


if __name__ == "__main__":
    main()
