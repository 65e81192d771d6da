"""The generated script reads like TRL's own scripts: `main` a short sequence of named steps,
short helpers, the evaluation and callbacks in files beside it, nothing run from strings, and
nothing imported from this project."""

from __future__ import annotations

import ast

from tests.helpers import REPO

TEMPLATES = REPO / "training" / "templates"
SIBLINGS = {"finetune_eval", "finetune_callbacks", "finetune_vision", "finetune_attention"}
PROBE = "finetune_probe"  # a script of its own beside train.py: it imports train.py, which never imports it


def _trees() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(TEMPLATES.glob("*.py"))}


def test_main_is_short_and_so_is_every_function():
    trees = _trees()
    assert set(trees) == {"train", PROBE, *SIBLINGS}
    lengths = {
        f"{name}.{node.name}": node.end_lineno - node.lineno + 1
        for name, tree in trees.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef)
    }
    assert lengths["train.main"] <= 60, lengths["train.main"]
    assert max(lengths.values()) <= 80, max(lengths.items(), key=lambda kv: kv[1])


def test_no_code_from_strings_and_no_import_of_the_project_nor_circles():
    for name, tree in _trees().items():
        calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not calls & {"exec", "eval", "compile"}, name
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"tasks", "training", "flows", "deployments"}, name
        if name in SIBLINGS:  # the siblings are imported by train.py, never the other way round
            assert not imported & {"train", PROBE, *SIBLINGS} - {name}, name
        if name == "train":
            assert PROBE not in imported
        if name == PROBE:
            assert imported & {PROBE, *SIBLINGS} == set() and "train" in imported
