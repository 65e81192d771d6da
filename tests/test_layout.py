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


def test_every_method_is_one_definition_that_every_door_reaches():
    """A method is its MethodDefinition; from it each door finds the method without a list of its
    own: the spec's method names, `flows/<method>.py` with its flow, a deployment in prefect.yaml,
    the served deployments, the REST client's names and `flows.inspect`'s verdicts."""
    import typing

    import yaml

    from deployments.client import METHOD_DEPLOYMENTS
    from deployments.serve import deployments
    from flows.recipe import method_flow
    from tasks.core.methods import METHODS
    from tasks.core.spec import Method

    assert list(typing.get_args(Method)) == list(METHODS)
    declared = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    served = {d.name: d.entrypoint for d in deployments()}
    for name, method in METHODS.items():
        assert method_flow(name).name == name and method_flow(name).description == method.title
        assert declared[name]["entrypoint"] == served[name] == f"flows/{name}.py:{name}"
        assert declared[name]["parameters"]["spec"]["method"] == name
        assert METHOD_DEPLOYMENTS[name] == f"{name}/{name}"
        assert (REPO / "examples" / f"{name}-tiny.yaml").exists()
