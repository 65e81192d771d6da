"""The agent skill (docs/agent-skill/) as an agent follows it: every shell block it shows runs,
in order, as written, against a Prefect server the skill's own commands start; its references
name every spec field and every error code there is."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, seed_prefect_home

SKILL = REPO / "docs" / "agent-skill"


def _blocks() -> list[str]:
    text = (SKILL / "SKILL.md").read_text()
    every = re.findall(r"```bash\n(.*?)```", text, re.S)
    checked = re.findall(r"<!-- skill-check -->\s*```bash\n(.*?)```", text, re.S)
    assert checked == every, "every bash block of SKILL.md is run by this test: mark it <!-- skill-check -->"
    return checked


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a minute or more alone: `make test-slow`, run by CI after `make test`
def test_every_command_of_the_skill_runs_as_written(trains, own_server, prefect_database: Path, tmp_path: Path):
    port = _free_port()
    # The one substitution: the skill's default port, so a developer's own server is left alone.
    script = "\n".join(_blocks()).replace("127.0.0.1:4200", f"127.0.0.1:{port}")
    (tmp_path / "examples").symlink_to(REPO / "examples")  # the skill runs in the engine's checkout
    env = {
        **{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "PREFECT_HOME": str(seed_prefect_home(tmp_path / "prefect-home", prefect_database)),
        "PREFECT_SERVER_API_PORT": str(port),
        "FINETUNE_RUNS_DIR": str(tmp_path / "runs"),
    }
    try:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=420,
        )
    finally:  # the server the skill started, whatever happened
        subprocess.run([sys.executable, "-m", "prefect", "server", "stop"], env=env, capture_output=True, timeout=60)
    log = (tmp_path / "my-run.log").read_text() if (tmp_path / "my-run.log").exists() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log[-3000:]
    assert '"waiting_for": "approval of the spend"' in done.stdout  # the pause the agent relays to its user
    assert '"state": "finished"' in done.stdout
    assert '"verdict": "improved' in done.stdout


def test_the_references_name_every_spec_field_and_every_error_code():
    from tasks.core.errors import ERROR_CODES
    from tasks.core.spec import Budget, Evaluation, Outputs, RunSpec

    spec_doc = (SKILL / "references" / "spec.md").read_text()
    for model in (RunSpec, Budget, Evaluation, Outputs):
        for field in model.model_fields:
            assert f"| `{field}` |" in spec_doc, f"references/spec.md does not describe {model.__name__}.{field}"
    errors_doc = (SKILL / "references" / "errors.md").read_text()
    for cls, (code, fix) in ERROR_CODES.items():
        assert f"| `{code}` | {cls} | {fix} |" in errors_doc
    mcp_doc = (SKILL / "references" / "mcp.md").read_text()
    from tests.helpers import MCP_TOOLS as TOOLS

    for tool in TOOLS:
        assert f"| `{tool}` |" in mcp_doc
