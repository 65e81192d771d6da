"""Serve the flows as deployments without a work pool: `python -m deployments.serve`.

Needs a Prefect server (`prefect server start`, PREFECT_API_URL set). Runs started from the
UI or the REST API then execute in this process.
"""

from __future__ import annotations

import os

from prefect import serve

from flows.dpo import dpo
from flows.grpo import grpo
from flows.recipe import recipe_flow
from flows.sft import sft


def main() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    serve(
        sft.to_deployment(name="sft", tags=["finetune", "sft"]),
        dpo.to_deployment(name="dpo", tags=["finetune", "dpo"]),
        grpo.to_deployment(name="grpo", tags=["finetune", "grpo"]),
        recipe_flow.to_deployment(name="recipe", tags=["finetune", "recipe"]),
    )


if __name__ == "__main__":
    main()
