"""The `hf-jobs` backend: the generated script on Hugging Face Jobs, through huggingface_hub.

How a run travels:
1. preflight: the token (HF_TOKEN or the Prefect Secret block), `whoami` (namespace, role,
   whether it can pay) and the flavor's price from `list_jobs_hardware()`, before anything
   is uploaded;
2. inputs: the job cannot see this disk, so `train.py`, the validated data and a local
   model folder go to a private staging repo `<namespace>/finetune-<run>` (a Hub model id is
   read by the job directly);
3. the job: `run_job` on the uv image with the plan's flavor, a timeout, labels that tie it
   to the run (one of them an idempotency key, looked up before every submission), and the
   token as a job *secret*. A short bootstrap downloads the staging repo and hands over to
   `uv run train.py --hub-repo <staging>`, which installs exactly the script's pinned
   (PEP 723) dependencies, resumes from checkpoints pushed by an earlier job, pushes each
   new checkpoint while it trains and its outputs at the end;
4. following: `inspect_job` for the stage and billed seconds, `fetch_job_logs` for the
   log (kept in logs/train.log, progress lines parsed by the monitor);
5. collecting: `snapshot_download` of model/, adapter/, trackio/ and train_result.json.

Network faults are retried with backoff; a 401/403/402 is never retried and says what to
fix. The token is passed to huggingface_hub calls and to the job as a secret only, and is
scrubbed from every message and log line this module writes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

from tasks.core.atomic import replace_path
from tasks.core.faults import attempts_of, is_offline, say_retry, status_of, with_retries
from tasks.core.hub_access import make_api, resolve_token, scrub, uses_xet
from tasks.core.models import InputUpload, JobHandle, JobSnapshot
from tasks.core.spec import runs_on_this_machine
from tasks.run.backends.base import (
    JOB_FILES,
    JOB_FOLDERS,
    Account,
    BackendError,
    JobRequest,
    load_handle,
    planned_upload,
    save_handle,
    tail_lines,
    uploaded_model_reference,
)

T = TypeVar("T")

UV_IMAGE = "ghcr.io/astral-sh/uv:python3.12-bookworm"  # huggingface_hub's own default for uv jobs
UPLOAD_BYTES_PER_S = 10e6  # an assumption for a home or office uplink; stated in the plan
UPLOAD_OVERHEAD_S = 5.0  # repo creation, pre-upload checks, the commit
RETRY_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 20.0)
STAGES = {
    "SCHEDULING": "scheduling",
    "RUNNING": "running",
    "COMPLETED": "completed",
    "ERROR": "failed",
    "CANCELED": "cancelled",
    "DELETED": "failed",
}
DEAD_STAGES = ("ERROR", "CANCELED", "DELETED")
INPUT_PATTERNS = ["train.py", "finetune_*.py", "finetune_rewards/*", "accelerate.yaml", "data/*", "inputs/*"]
OUTPUT_PATTERNS = ["model/*", "adapter/*", "trackio/*", "train_result.json"]
# Runs inside the job: fetch the staging repo, then run the script with its own pinned deps.
BOOTSTRAP = """\
import subprocess, sys, tempfile
from huggingface_hub import snapshot_download
repo = sys.argv[1]
where = snapshot_download(repo, allow_patterns=PATTERNS, local_dir=tempfile.mkdtemp(prefix="finetune-"))
print(f"inputs from {repo} in {where}", flush=True)
sys.exit(subprocess.call(["uv", "run", where + "/train.py", "--hub-repo", repo]))
""".replace("PATTERNS", repr(INPUT_PATTERNS))


def _keep_earlier_log(run_dir: Path) -> None:
    """logs/train.log mirrors the current job's log; an earlier job's copy is kept beside it."""
    log = run_dir / "logs" / "train.log"
    earlier = load_handle(run_dir)
    if log.exists() and earlier is not None:
        log.replace(log.with_name(f"train.{earlier.job_id}.log"))


def label_value(text: str) -> str:
    """Job labels allow letters, digits, '-' and '_' only."""
    return re.sub(r"[^a-zA-Z0-9_-]", "-", text)[:63]


def idempotency_key(run_name: str, script_sha256: str, attempt: int) -> str:
    return hashlib.sha256(f"{run_name}:{script_sha256}:{attempt}".encode()).hexdigest()[:16]


def staging_repo_name(namespace: str, run_name: str) -> str:
    return f"{namespace}/finetune-{run_name}"[:96]


class HfJobsBackend:
    name = "hf-jobs"
    on_this_machine = runs_on_this_machine(name)
    poll_s = 10.0  # each poll reads the job state and its log over HTTP

    def __init__(
        self, retry_delays_s: tuple[float, ...] = RETRY_DELAYS_S, sleep: Callable[[float], None] | None = None
    ):
        self.retry_delays_s = retry_delays_s
        self.sleep = sleep
        self._namespace: dict[str, str] = {}

    # ------------------------------------------------------------------ plumbing
    def _token(self) -> str:
        token = resolve_token()
        if not token:
            raise BackendError(
                "no Hugging Face token for backend hf-jobs: set HF_TOKEN to a token with write access "
                "(https://huggingface.co/settings/tokens), or store one in a Prefect Secret block named "
                f"'{os.environ.get('FINETUNE_HF_TOKEN_BLOCK', 'hf-token')}'"
            )
        return token

    def _api(self, token: str) -> Any:
        return make_api(token)

    def _endpoint(self) -> str:
        return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"

    def _refusal(self, what: str, e: BaseException, token: str) -> BackendError:
        """The message for an error that is not retried: what failed and what to fix."""
        status = status_of(e)
        if status == 401:
            return BackendError(
                f"{what}: the Hub refused the token (HTTP 401); HF_TOKEN (or the Secret block) is invalid "
                "or expired. Create a token with write access at https://huggingface.co/settings/tokens"
            )
        if status == 403:
            return BackendError(
                f"{what}: the token is not allowed to do this (HTTP 403). Jobs need a token with write "
                "access to the namespace (a 'write' token, or a fine-grained one allowed to start Jobs "
                "and write repos there)"
            )
        if status == 402:
            return BackendError(
                f"{what}: the namespace cannot pay for Jobs (HTTP 402). Add a payment method or "
                "credits at https://huggingface.co/settings/billing, or choose backend: local"
            )
        if is_offline(e):
            return BackendError(
                f"{what}: HF_HUB_OFFLINE=1 is set, so huggingface_hub makes no network call; unset it to "
                "train on Hugging Face Jobs"
            )
        tries = attempts_of(e)
        after = f" after {tries} attempts" if tries > 1 else ""
        return BackendError(f"{what} failed{after} ({self._endpoint()}): {scrub(f'{type(e).__name__}: {e}', token)}")

    def _call(
        self, what: str, fn: Callable[[], T], token: str, retry: bool = True, delays: tuple[float, ...] | None = None
    ) -> T:
        """Run one Hub call; retry network faults and 429/5xx with backoff; turn refusals into
        messages that say what to fix. Never lets the token into a message."""
        delays = (self.retry_delays_s if delays is None else delays) if retry else ()
        try:
            return with_retries(fn, delays, self.sleep, on_retry=say_retry(what))
        except BackendError:
            raise
        except Exception as e:
            raise self._refusal(what, e, token) from None

    def _whoami(self, token: str) -> dict[str, Any]:
        """The first call of a run: a short retry schedule, so an endpoint that is down is
        reported within seconds, before anything else is tried."""
        api = self._api(token)
        return self._call("checking the token (whoami)", lambda: api.whoami(), token, delays=self.retry_delays_s[:3])

    def _namespace_for(self, token: str) -> str:
        key = hashlib.sha256(token.encode()).hexdigest()
        if key not in self._namespace:
            self._namespace[key] = str(self._whoami(token)["name"])
        return self._namespace[key]

    # ------------------------------------------------------------------ planning
    model_reference = staticmethod(uploaded_model_reference)

    def planned_inputs(self, run_dir: Path, model_path: str, baseline_path: str | None = None) -> InputUpload | None:
        where = f"private Hub repo <your namespace>/finetune-{run_dir.name}"
        return planned_upload(run_dir, model_path, baseline_path, where, UPLOAD_BYTES_PER_S, UPLOAD_OVERHEAD_S)

    def preflight(self, flavor: str) -> Account:
        token = self._token()
        info = self._whoami(token)
        namespace = str(info.get("name"))
        role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise BackendError(
                f"the token for '{namespace}' is read-only; Jobs and the staging repo need a token with write "
                "access (https://huggingface.co/settings/tokens)"
            )
        if info.get("canPay") is False:
            raise BackendError(
                f"the namespace '{namespace}' has no payment method or credits for Jobs; add them at "
                "https://huggingface.co/settings/billing, or choose backend: local"
            )
        self._namespace[hashlib.sha256(token.encode()).hexdigest()] = namespace
        price, source = None, "catalogue (the Jobs hardware list did not answer)"
        try:
            api = self._api(token)
            for hw in self._call("listing Jobs hardware", lambda: api.list_jobs_hardware(), token, retry=False):
                if hw.name == flavor:
                    per = {"minute": 60.0, "second": 3600.0, "hour": 1.0}.get(str(hw.unit_label).lower(), 60.0)
                    price, source = round(float(hw.unit_cost_usd) * per, 6), "list_jobs_hardware()"
                    break
            else:
                source = f"catalogue (flavor '{flavor}' is not in the Jobs hardware list)"
        except BackendError as e:
            source = f"catalogue ({str(e)[:160]})"
        return Account(namespace=namespace, price_per_hour_usd=price, price_source=source)

    # ------------------------------------------------------------------ submission
    def _labels(self, request: JobRequest) -> dict[str, str]:
        return {
            "finetune-run": label_value(request.run_name),
            "finetune-key": idempotency_key(request.run_name, request.script.sha256, request.attempt),
            "finetune-attempt": str(request.attempt),
        }

    def _handle(self, job: Any, request: JobRequest, namespace: str, staging: str) -> JobHandle:
        return JobHandle(
            backend=self.name,
            job_id=str(job.id),
            run_dir=request.run_dir,
            log_path=str(Path(request.run_dir) / "logs" / "train.log"),
            started_at=job.created_at or datetime.now(UTC),
            namespace=namespace,
            endpoint=self._endpoint(),
            url=getattr(job, "url", None),
            flavor=str(job.flavor or request.flavor),
            timeout_s=request.timeout_s,
            staging_repo=staging,
            labels=self._labels(request),
            attempt=request.attempt,
            flow_run_id=request.flow_run_id,
        )

    def find_live(self, request: JobRequest) -> JobHandle | None:
        token = self._token()
        namespace = self._namespace_for(token)
        api = self._api(token)
        key = self._labels(request)["finetune-key"]
        jobs = self._call(
            "looking for this run's job",
            lambda: list(api.list_jobs(labels={"finetune-key": key}, namespace=namespace)),
            token,
        )
        # the server filters by label; checking again costs nothing and never re-attaches to another run's job
        alive = [
            j for j in jobs if (j.labels or {}).get("finetune-key") == key and str(j.status.stage) not in DEAD_STAGES
        ]
        if not alive:
            return None
        newest = max(alive, key=lambda j: j.created_at or datetime.min.replace(tzinfo=UTC))
        handle = self._handle(newest, request, namespace, staging_repo_name(namespace, request.run_name))
        save_handle(handle)
        return handle

    def upload_inputs(self, request: JobRequest, staging: str, token: str) -> None:
        api = self._api(token)
        run_dir = Path(request.run_dir)
        self._call(
            f"creating the private staging repo {staging}",
            lambda: api.create_repo(staging, repo_type="model", private=True, exist_ok=True),
            token,
        )
        if request.training_key:
            self._set_aside_other_checkpoints(api, staging, request.training_key, token)
        self._call(
            f"uploading the script and data to {staging}",
            lambda: api.upload_folder(
                repo_id=staging,
                folder_path=str(run_dir),
                allow_patterns=[*JOB_FILES, *(f"{f}/**" for f in JOB_FOLDERS), "evals/**", "training_key"],
                commit_message=f"inputs of run {request.run_name}",
            ),
            token,
        )
        for slot, folder in (("model", request.model_path), ("baseline", request.baseline_path)):
            if folder is not None and Path(folder).is_dir():
                self._call(
                    f"uploading the {slot} folder {folder} to {staging}",
                    lambda folder=folder, slot=slot: api.upload_folder(
                        repo_id=staging,
                        folder_path=folder,
                        path_in_repo=f"inputs/{slot}",
                        ignore_patterns=[".cache/*", "*.lock"],
                        commit_message=f"the {slot} model",
                    ),
                    token,
                )

    def _set_aside_other_checkpoints(self, api: Any, staging: str, key: str, token: str) -> None:
        """Checkpoints that an earlier job made from other inputs (a changed spec, data or
        script) must not be resumed: they are deleted from the staging repo in one commit,
        and stay recoverable from the repo's history."""
        files = self._call(f"listing {staging}", lambda: api.list_repo_files(staging), token)
        if not any(f.startswith("checkpoints/") for f in files):
            return
        earlier = None
        if "training_key" in files:
            path = self._call(
                f"reading the training key of {staging}",
                lambda: api.hf_hub_download(staging, "training_key", local_dir=None),
                token,
            )
            earlier = Path(path).read_text().strip()
        if earlier == key:
            return
        self._call(
            f"setting aside the checkpoints in {staging}",
            lambda: api.delete_folder(
                "checkpoints",
                repo_id=staging,
                commit_message=f"checkpoints of other inputs ({earlier or 'unkeyed'}), superseded by {key}; "
                "recoverable from this repo's history",
            ),
            token,
        )

    def job_command(self, staging: str) -> list[str]:
        hub = version("huggingface_hub")
        return ["uv", "run", "--with", f"huggingface_hub=={hub}", "python", "-c", BOOTSTRAP, staging]

    def job_environment(self) -> dict[str, str]:
        env = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        endpoint = os.environ.get("HF_ENDPOINT")
        if endpoint:
            env["HF_ENDPOINT"] = endpoint
            if not uses_xet(endpoint):
                env["HF_HUB_DISABLE_XET"] = "1"
        return env

    def submit(self, request: JobRequest) -> JobHandle:
        existing = self.find_live(request)
        if existing is not None:
            return existing
        token = self._token()
        namespace = self._namespace_for(token)
        staging = staging_repo_name(namespace, request.run_name)
        self.upload_inputs(request, staging, token)
        api = self._api(token)
        labels = self._labels(request)

        def create() -> Any:
            return api.run_job(
                image=UV_IMAGE,
                command=self.job_command(staging),
                env=self.job_environment(),
                secrets={"HF_TOKEN": token},
                flavor=request.flavor,
                timeout=request.timeout_s,
                name=label_value(f"finetune-{request.run_name}"),
                labels=labels,
                namespace=namespace,
            )

        try:
            # The request may have reached the server before the connection dropped: before
            # sending another, look for the job by its key.
            job = with_retries(
                create,
                self.retry_delays_s,
                self.sleep,
                on_retry=say_retry("submitting the job"),
                before_retry=lambda: self.find_live(request),
            )
        except Exception as e:
            raise self._refusal("submitting the job", e, token) from None
        if isinstance(job, JobHandle):  # found alive after a lost answer
            return job
        handle = self._handle(job, request, namespace, staging)
        _keep_earlier_log(Path(request.run_dir))
        save_handle(handle)
        return handle

    # ------------------------------------------------------------------ following
    def status(self, handle: JobHandle) -> JobSnapshot:
        token = self._token()
        api = self._api(token)
        job = self._call(
            f"reading the state of job {handle.job_id}",
            lambda: api.inspect_job(job_id=handle.job_id, namespace=handle.namespace),
            token,
        )
        stage = str(job.status.stage)
        d = job.durations
        # Jobs bill while starting and running; the server's total counts from creation, which
        # never underestimates. Without durations, count from creation ourselves.
        if d is not None and d.total_secs is not None:
            billed = float(d.total_secs)
        else:
            since = job.created_at or handle.started_at
            end = job.finished_at or datetime.now(UTC)
            billed = max((end - since).total_seconds(), 0.0)
        message = scrub(job.status.message, token) if job.status.message else None
        return JobSnapshot(state=STAGES.get(stage, "running"), billed_s=billed, message=message)  # type: ignore[arg-type]

    def _all_log_lines(self, handle: JobHandle, token: str, tail: int | None = None) -> list[str]:
        api = self._api(token)
        lines = self._call(
            f"reading the log of job {handle.job_id}",
            lambda: list(api.fetch_job_logs(job_id=handle.job_id, namespace=handle.namespace, tail=tail)),
            token,
        )
        return [scrub(str(line).rstrip("\n"), token) for line in lines]

    def read_log(self, handle: JobHandle, start: int) -> list[str]:
        token = self._token()
        lines = self._all_log_lines(handle, token)
        path = Path(handle.log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        known = path.read_text(encoding="utf-8", errors="replace").count("\n") if path.exists() else 0
        if len(lines) > known:  # the local copy of the job's log, whole, replaced atomically
            tmp = path.with_suffix(".log.tmp")
            tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            tmp.replace(path)
        return lines[start:]

    def logs(self, handle: JobHandle, tail: int = 50) -> str:
        try:
            return tail_lines(self._all_log_lines(handle, self._token(), tail=tail), tail)
        except BackendError:  # the Hub is unreachable: the local copy is the next best thing
            path = Path(handle.log_path)
            return tail_lines(path.read_text(errors="replace").splitlines(), tail) if path.exists() else ""

    def cancel(self, handle: JobHandle) -> None:
        token = self._token()
        api = self._api(token)
        self._call(
            f"cancelling job {handle.job_id}",
            lambda: api.cancel_job(job_id=handle.job_id, namespace=handle.namespace),
            token,
        )

    def fetch(self, handle: JobHandle) -> None:
        """Download the outputs into an empty folder, then move them into the run folder.

        Into an empty folder because snapshot_download, when the repo cannot be reached,
        returns a non-empty local_dir as if it were the download; outputs of an earlier job
        would then pass for this one's. Moved into place only when whole, so a cut download
        leaves the run folder as it was.
        """
        token = self._token()
        api = self._api(token)
        staging = handle.staging_repo or ""
        run_dir = Path(handle.run_dir)
        incoming = run_dir / ".incoming"
        shutil.rmtree(incoming, ignore_errors=True)
        incoming.mkdir(parents=True)
        try:
            self._call(
                f"downloading the outputs from {staging}",
                lambda: api.snapshot_download(staging, allow_patterns=OUTPUT_PATTERNS, local_dir=incoming),
                token,
            )
            if not (incoming / "train_result.json").exists():
                raise BackendError(
                    f"job {handle.job_id} completed but {staging} holds no train_result.json: the outputs were not "
                    f"pushed completely; see the job's log in {handle.log_path}"
                )
            for entry in sorted(incoming.iterdir()):
                if entry.name != ".cache":
                    replace_path(entry, run_dir / entry.name)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
