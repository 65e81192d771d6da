"""A stand-in for the Hugging Face Jobs API that really runs each job, as a local process.

It extends the Hub stand-in (same server, same HF_ENDPOINT, same repos) with the routes
huggingface_hub 2.4 calls for Jobs: create (`POST /api/jobs/{ns}`), list with label and
stage filters, inspect, cancel, logs as server-sent events, and the hardware list. A job's
command runs in a fresh temporary folder with only the job's environment and secrets (and
PATH), as a container would. The job image is emulated: the uv images' `uv` is a shim that
runs `uv run [--with X] CMD...` with this interpreter, whose environment already holds the
script's pinned dependencies (uv itself cannot install here: there is no internet).

Durations are whole seconds rounded up, as a per-second bill counts them: a job that was
created is billed at least 1 s, however fast the machine runs it.

Knobs: `schedule_s` (time a job spends SCHEDULING), `can_pay` (whoami's canPay),
`hardware` (the price list), `fail_next_jobs` (what the next jobs print before failing),
and the Hub stand-in's `drop_next` / `fail_next` for faults on any route.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.hub_standin import JSON, HubError, HubStandin, _Req

STANDIN_TOKEN = "test-jobs-token-0123456789abcdef"  # what the tests' stand-in accepts; never a real token

UV_SHIM = f"""#!{sys.executable}
# Stand-in for the uv of the job image: `uv run [--with PKG]... [--python V] [--] CMD...`
import os, sys
args = sys.argv[1:]
if not args or args[0] != "run":
    sys.exit("uv shim: only `uv run` is emulated, got " + " ".join(args))
args = args[1:]
while args and args[0] in ("--with", "--python"):
    args = args[2:]
if args and args[0] == "--":
    args = args[1:]
if args and args[0] == "python":
    args = args[1:]
os.execv(sys.executable, [sys.executable, *args])
"""

DEFAULT_HARDWARE = [
    {"name": "cpu-basic", "prettyName": "CPU Basic", "cpu": "2 vCPU", "ram": "16 GB", "accelerator": None,
     "unitCostMicroUSD": 167, "unitCostUSD": 0.000167, "unitLabel": "minute"},
    {"name": "t4-small", "prettyName": "Nvidia T4 - small", "cpu": "4 vCPU", "ram": "15 GB",
     "accelerator": {"type": "gpu", "model": "T4", "quantity": "1", "vram": "16 GB", "manufacturer": "Nvidia"},
     "unitCostMicroUSD": 6667, "unitCostUSD": 0.006667, "unitLabel": "minute"},
    {"name": "a10g-large", "prettyName": "Nvidia A10G - large", "cpu": "12 vCPU", "ram": "46 GB",
     "accelerator": {"type": "gpu", "model": "A10G", "quantity": "1", "vram": "24 GB", "manufacturer": "Nvidia"},
     "unitCostMicroUSD": 25000, "unitCostUSD": 0.025, "unitLabel": "minute"},
]  # fmt: skip


@dataclass
class Job:
    id: str
    namespace: str
    spec: JSON
    created: float
    stage: str = "SCHEDULING"
    message: str | None = None
    started: float | None = None
    finished: float | None = None
    logs: list[tuple[str, str]] = field(default_factory=list)  # (timestamp, line)
    proc: subprocess.Popen | None = None
    workdir: str = ""
    cancel_requested: bool = False


def _billed_secs(seconds: float) -> int:
    """Whole seconds as a per-second bill counts them: any part of a second is a second."""
    return max(math.ceil(seconds), 1) if seconds > 0 else 0


def _iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z") if t else None


class JobsStandin(HubStandin):
    extra_routes = [
        ("GET", re.compile(r"/api/jobs/hardware"), "jobs_hardware", False, False),
        ("POST", re.compile(r"/api/jobs/(?P<ns>[^/]+)"), "create_job", True, False),
        ("GET", re.compile(r"/api/jobs/(?P<ns>[^/]+)"), "list_jobs", False, False),
        ("GET", re.compile(r"/api/jobs/(?P<ns>[^/]+)/(?P<job_id>[0-9a-f]+)"), "inspect_job", False, False),
        ("POST", re.compile(r"/api/jobs/(?P<ns>[^/]+)/(?P<job_id>[0-9a-f]+)/cancel"), "cancel_job", True, False),
        ("GET", re.compile(r"/api/jobs/(?P<ns>[^/]+)/(?P<job_id>[0-9a-f]+)/logs"), "raw_job_logs", False, False),
    ]

    def __init__(self, *, schedule_s: float = 0.3, can_pay: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.schedule_s = schedule_s
        self.can_pay = can_pay
        self.hardware: list[JSON] = [dict(h) for h in DEFAULT_HARDWARE]
        self.jobs: dict[str, Job] = {}
        self.received_bodies: list[bytes] = []  # every create-job request body, as sent
        self.fail_next_jobs: list[str] = []  # the next jobs print this and exit 1 instead of running
        self.kill_next_jobs_at: list[str] = []  # the next jobs are killed (SIGKILL) when a log line holds this
        self._bin = Path(tempfile.mkdtemp(prefix="jobs-standin-bin-"))
        shim = self._bin / "uv"
        shim.write_text(UV_SHIM)
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)

    # ------------------------------------------------------------------ routes
    def whoami(self, req: _Req) -> JSON:
        return {**super().whoami(req), "canPay": self.can_pay}

    def jobs_hardware(self, req: _Req) -> list[JSON]:
        return self.hardware

    def create_job(self, req: _Req, ns: str) -> JSON:
        if ns != self.username:
            raise HubError(403, f"You cannot create jobs in namespace {ns}")
        if not self.can_pay:
            raise HubError(402, "Payment required: add a payment method to run Jobs")
        with self._lock:
            self.received_bodies.append(req.body)
        spec = req.json()
        job = Job(id=secrets.token_hex(12), namespace=ns, spec=spec, created=time.time())
        with self._lock:
            self.jobs[job.id] = job
        threading.Thread(target=self._run, args=(job,), daemon=True).start()
        return self._info(job)

    def list_jobs(self, req: _Req, ns: str) -> list[JSON]:
        labels = [v.split("=", 1) for v in req.query.get("label", [])]
        stages = set(req.query.get("stage", []))
        with self._lock:
            jobs = [j for j in self.jobs.values() if j.namespace == ns]
        out = []
        for j in jobs:
            have = j.spec.get("labels") or {}
            if all(have.get(k) == v for k, v in labels) and (not stages or j.stage in stages):
                out.append(self._info(j))
        return out

    def inspect_job(self, req: _Req, ns: str, job_id: str) -> JSON:
        return self._info(self._job(ns, job_id))

    def cancel_job(self, req: _Req, ns: str, job_id: str) -> JSON:
        job = self._job(ns, job_id)
        with self._lock:
            job.cancel_requested = True
            if job.stage == "SCHEDULING":
                job.stage, job.finished = "CANCELED", time.time()
        if job.proc is not None and job.proc.poll() is None:
            try:
                os.killpg(job.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        return {}

    def raw_job_logs(self, req: _Req, ns: str, job_id: str) -> tuple[int, dict[str, str], bytes]:
        """The whole log so far as server-sent events; the stream ends when the log is replayed
        (huggingface_hub then asks for the job's stage, and reconnects while it runs)."""
        job = self._job(ns, job_id)
        with self._lock:
            events = [("", "===== Job started =====")] if job.started else []
            events += list(job.logs)
        tail = req.query.get("tail")
        if tail:
            events = events[-int(tail[0]) :]
        body = "".join(
            f"data: {json.dumps({'data': line, 'timestamp': ts or _iso(job.created)})}\n\n" for ts, line in events
        )
        return 200, {"Content-Type": "text/event-stream"}, body.encode()

    # ------------------------------------------------------------------ helpers
    def _job(self, ns: str, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None or job.namespace != ns:
            raise HubError(404, f"Job {job_id} not found")
        return job

    def _info(self, job: Job) -> JSON:
        now = time.time()
        end = job.finished or now
        running = end - job.started if job.started else None
        s = job.spec
        return {
            "id": job.id,
            "createdAt": _iso(job.created),
            "startedAt": _iso(job.started),
            "finishedAt": _iso(job.finished),
            "dockerImage": s.get("dockerImage"),
            "spaceId": s.get("spaceId"),
            "command": s.get("command"),
            "arguments": s.get("arguments", []),
            "environment": s.get("environment", {}),
            "secrets": sorted((s.get("secrets") or {}).keys()),  # names only, like the real API
            "flavor": s.get("flavor"),
            "labels": s.get("labels"),
            "status": {"stage": job.stage, "message": job.message},
            "durations": {  # whole seconds, rounded up: never 0 for a job that ran
                "schedulingSecs": _billed_secs((job.started or end) - job.created),
                "runningSecs": _billed_secs(running) if running is not None else None,
                "totalSecs": _billed_secs(end - job.created),
            },
            "owner": {"id": "0" * 24, "name": job.namespace, "type": "user"},
        }

    def _log(self, job: Job, line: str) -> None:
        with self._lock:
            job.logs.append((_iso(time.time()) or "", line))

    def _run(self, job: Job) -> None:
        time.sleep(self.schedule_s)
        with self._lock:
            if job.stage != "SCHEDULING":
                return
            job.stage, job.started = "RUNNING", time.time()
        job.workdir = tempfile.mkdtemp(prefix=f"job-{job.id[:8]}-")
        env = {
            "PATH": f"{self._bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": job.workdir,
            "HF_HOME": str(Path(job.workdir) / ".hf"),
            "TMPDIR": job.workdir,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            **{k: str(v) for k, v in (job.spec.get("environment") or {}).items()},
            **{k: str(v) for k, v in (job.spec.get("secrets") or {}).items()},
        }
        command = [*job.spec["command"], *job.spec.get("arguments", [])]
        with self._lock:
            failure = self.fail_next_jobs.pop(0) if self.fail_next_jobs else None
            kill_at = self.kill_next_jobs_at.pop(0) if self.kill_next_jobs_at and failure is None else None
        if failure is not None:  # e.g. the GPU ran out of memory
            command = [sys.executable, "-c", f"import sys; print({failure!r}); sys.exit(1)"]
        try:
            job.proc = subprocess.Popen(
                command,
                cwd=job.workdir,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as e:
            self._end(job, "ERROR", f"could not start the command: {e}")
            return
        timeout = job.spec.get("timeoutSeconds")
        if timeout:
            threading.Timer(float(timeout), self._time_out, args=(job,)).start()
        assert job.proc.stdout is not None
        for raw in job.proc.stdout:
            for line in raw.decode("utf-8", "replace").replace("\r", "\n").splitlines():
                if line.strip():
                    self._log(job, line)
                if kill_at is not None and kill_at in line and job.proc.poll() is None:
                    os.killpg(job.proc.pid, signal.SIGKILL)  # the machine went away mid-run
                    kill_at = None
        code = job.proc.wait()
        if job.cancel_requested:
            self._end(job, "CANCELED", None)
        elif job.message == "timeout":
            self._end(job, "ERROR", "Job timeout")
        elif code == 0:
            self._end(job, "COMPLETED", None)
        else:
            self._end(job, "ERROR", f"exit code {code}" if code > 0 else f"killed by signal {-code}")

    def _time_out(self, job: Job) -> None:
        if job.proc is not None and job.proc.poll() is None:
            job.message = "timeout"
            os.killpg(job.proc.pid, signal.SIGKILL)

    def _end(self, job: Job, stage: str, message: str | None) -> None:
        with self._lock:
            job.stage, job.message, job.finished = stage, message, time.time()

    def stop(self) -> None:
        for job in list(self.jobs.values()):
            if job.proc is not None and job.proc.poll() is None:
                os.killpg(job.proc.pid, signal.SIGKILL)
                job.proc.wait(timeout=30)
            if job.workdir:  # each job's machine goes away with it, as on the real service
                shutil.rmtree(job.workdir, ignore_errors=True)
        shutil.rmtree(self._bin, ignore_errors=True)
        super().stop()
