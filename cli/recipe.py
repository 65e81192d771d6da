"""The command line of `python -m flows.recipe --spec RECIPE.yaml [--dry-run] [--json]`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cli.run import set_override
from cli.server import bind_temporary_server
from tasks.core.errors import UserFacingError, error_payload
from tasks.core.recipe import default_recipe_name, load_recipe
from tasks.core.spec import SpecError
from tasks.report.recipe import recipe_text


def main(flow: Any, argv: list[str] | None = None) -> int:
    """`flow` is the recipe flow; a dry run calls its plain function (plans only, no server)."""
    p = argparse.ArgumentParser(prog="python -m flows.recipe", description="Run a recipe: stages chained in order.")
    p.add_argument("--spec", required=True, help="recipe YAML (a `stages` list; see examples/grpo-tiny.yaml)")
    p.add_argument("--name", help="recipe name (stage runs are runs/<name>-<stage>)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field (budget.max_usd=3) or one stage's (warmup.training.max_steps=10)",
    )
    p.add_argument("--dry-run", action="store_true", help="plan every stage and price the chain; run nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout (for agents)")
    p.add_argument("--approve-up-to", type=float, default=None, metavar="USD", help="pre-approve the chain up to USD")
    p.add_argument("--approval-timeout", type=int, default=3600, metavar="S", help="how long a stage waits")
    args = p.parse_args(argv)
    try:
        overrides: dict[str, Any] = {}
        for item in args.set:
            set_override(overrides, item)
        if args.name:
            overrides["name"] = args.name
        recipe = load_recipe(args.spec, overrides)
        recipe = recipe.model_copy(update={"name": recipe.name or default_recipe_name(recipe)})
        if args.dry_run:
            result = flow.fn(recipe, dry_run=True)
        else:
            bind_temporary_server()  # none is left running if this process is killed
            result = flow(recipe=recipe, approve_up_to_usd=args.approve_up_to, approval_timeout_s=args.approval_timeout)
    except (UserFacingError, SpecError, ValueError, NotImplementedError, RuntimeError) as e:
        if args.json:
            print(json.dumps(error_payload(e)))
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.model_dump_json(indent=2) if args.json else recipe_text(result))
    return 0 if result.error is None else 1
