"""The layout holds: a flow module never hides a package of the repository."""

from __future__ import annotations

from tests.helpers import REPO

PACKAGES = {p.name for p in REPO.iterdir() if (p / "__init__.py").exists()}


def test_no_flow_module_is_named_like_a_package_of_the_repository():
    """Prefect loads a deployment's flow by its file and puts flows/ first on the import path, so a
    flows/training.py would hide the training package from the run it loads (it crashed served runs)."""
    modules = {p.stem for p in (REPO / "flows").glob("*.py")}
    assert PACKAGES >= {"flows", "tasks", "training", "cli", "deployments"}
    assert not modules & PACKAGES
