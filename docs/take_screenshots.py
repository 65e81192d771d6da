"""Regenerate the UI screenshots in docs/screenshots/: `python docs/take_screenshots.py`.

Starts a Prefect server with its UI (a free port, a temporary PREFECT_HOME), serves the
deployments, then in a headless Chromium: the sft deployment's page and Custom run form, a run
started from it, its Resume (approval) form filled and submitted, the finished run's artifacts.
Needs Debian's chromium (`apt-get install chromium`) and playwright (`make install` has it).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.ui_browser import deployments_served, server_with_ui, walkthrough  # noqa: E402

OUT = REPO / "docs" / "screenshots"
KEEP = (
    "deployment.png",
    "custom-run-form.png",
    "resume-form-filled.png",
    "resumed.png",
    "run-artifacts.png",
    "artifact-plan.png",
    "artifact-loss.png",
    "artifact-report.png",
)


def main() -> int:
    spec = {
        "name": "ui-walkthrough",
        "method": "sft",
        "model": "tiny",
        "dataset": str(REPO / "examples" / "data" / "sft_chat.jsonl"),
        "training": {"max_steps": 30, "learning_rate": 3.0e-3, "per_device_train_batch_size": 8, "max_length": 96},
        "flavors": {"local-cpu": {"price_per_hour": 2.0}},
        "budget": {"max_usd": 2, "auto_approve_usd": 0},
        "outputs": {"gguf": ["q8_0"]},
    }
    with tempfile.TemporaryDirectory(prefix="finetune-screenshots-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "FINETUNE_RUNS_DIR": str(work / "runs")}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with server_with_ui(work / "home", port, work / "server.log") as base:
            with deployments_served(base, env, work / "serve.log"):
                done = walkthrough(base, spec, work, reason="approved in the UI")
        if done["state"] != "COMPLETED":
            print(f"the run ended {done['state']}: {(work / 'serve.log').read_text()[-3000:]}", file=sys.stderr)
            return 1
        OUT.mkdir(parents=True, exist_ok=True)
        for name in KEEP:
            (OUT / name).write_bytes((work / name).read_bytes())
            print(OUT / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
