"""Soak: many tiny SFT flows, back to back and then at once, and what they leave behind.

    python -m benchmarks.soak [--runs 5] [--concurrent 3] [--out benchmarks/results]

Each flow is its own process, `python -m flows.sft --spec <copy of examples/sft-tiny.yaml>`,
as a user starts it, with its own run name. Everything a flow writes goes into one temporary
workspace, so nothing of the user's is touched and what is left there is the flows' for
certain: FINETUNE_RUNS_DIR, PREFECT_HOME (one for the whole soak, as one machine has one, so
the concurrent flows share its database), TMPDIR and HF_DATASETS_CACHE point there, and each
run publishes to its own folder there. The publish lock is non-blocking by design (a second
flow publishing to the same target fails with RunLocked), so a shared target would make the
concurrent batch fail on purpose rather than measure anything.

The targets: no failed flow, no leaked process (anything still alive after the flows ended:
a descendant of a flow, or a new process whose command line names train.py, the runs folder,
llama or a Prefect server), no leaked file descriptor in this process, and no disk growth
outside the run and publish folders (PREFECT_HOME, the datasets cache and TMPDIR step by
step; the system temp dir and the home-folder caches before and after, for hard-coded paths).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "examples" / "sft-tiny.yaml"
TAIL = 25  # lines of a failed flow's output kept in the report
# the home-folder places a flow may write to; all are measured before and after
HOME_PLACES = [Path.home() / p for p in (".prefect", ".cache/finetune-flow", ".cache/huggingface", ".trackio")]


@dataclass
class Run:
    """One flow process: what it was asked to do and how it ended."""

    name: str
    batch: str
    spec: str
    log: str
    exit_code: int | None = None
    seconds: float = 0.0
    report_error: str | None = "no report.json"
    failed_stages: list[str] = field(default_factory=list)
    run_dir_bytes: int = 0
    published_bytes: int = 0
    tail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.report_error is None and not self.failed_stages


def du(path: Path) -> int:
    """Bytes under a path (files counted once per inode, as the disk holds them)."""
    if not path.exists():
        return 0
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def own_fds() -> dict[int, str]:
    """This process's open file descriptors and what each points to."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # the descriptor listdir itself used
    return out


def process_table() -> dict[int, tuple[float, str]]:
    """pid -> (start time, command line) of every process visible now."""
    table = {}
    for p in psutil.process_iter(["pid", "create_time", "cmdline"]):
        table[p.info["pid"]] = (p.info["create_time"] or 0.0, shlex.join(p.info["cmdline"] or []))
    return table


class Descendants:
    """Every process the flows start, and the files they hold open in watched places, sampled while
    they run: a process reparented to init once its flow ends (a daemonised server, a detached
    job) is still known here, and a file left in the temp dir can be traced to a flow."""

    def __init__(self, watched: list[Path], interval_s: float = 0.5) -> None:
        self.seen: dict[tuple[int, float], str] = {}
        self.open_files: set[str] = set()
        self.watched, self.interval_s = tuple(str(w) + os.sep for w in watched), interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for p in me.children(recursive=True):
                try:
                    key = (p.pid, p.create_time())
                    if key not in self.seen:
                        self.seen[key] = shlex.join(p.cmdline())
                    self.open_files.update(f.path for f in p.open_files() if f.path.startswith(self.watched))
                except psutil.Error:
                    pass
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Descendants:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def write_spec(work: Path, name: str) -> Path:
    """A copy of the tiny spec with its name set, its dataset made absolute (load_spec resolves
    a relative dataset against the spec's folder, which is now the workspace) and a publish
    folder of its own in the workspace."""
    data = yaml.safe_load(SPEC.read_text())
    data["name"] = name
    data["dataset"] = str((SPEC.parent / data["dataset"]).resolve())
    data["outputs"]["hub_repo"] = str(work / "published" / name)
    path = work / "specs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start(run: Run, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], float]:
    with open(run.log, "wb") as log:  # the child holds its own copy; ours closes here
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.sft", "--spec", run.spec],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return proc, time.perf_counter()


def wait_all(started: list[tuple[Run, subprocess.Popen[bytes], float]]) -> None:
    """Wait for every flow, timing each to its own end (not to the end of the one before)."""
    pending = list(started)
    while pending:
        for item in list(pending):
            run, proc, began = item
            if proc.poll() is not None:
                run.exit_code, run.seconds = proc.returncode, round(time.perf_counter() - began, 1)
                pending.remove(item)
        time.sleep(0.2)


def finish(run: Run, runs_dir: Path, work: Path) -> None:
    report = runs_dir / run.name / "report.json"
    if report.exists():
        summary = json.loads(report.read_text())
        run.report_error = summary.get("error")
        run.failed_stages = [
            f"{s['stage']}: {s['status']} {s.get('detail', '')}".strip()
            for s in summary.get("stages", [])
            if s.get("status") == "failed"
        ]
    run.run_dir_bytes = du(runs_dir / run.name)
    run.published_bytes = du(work / "published" / run.name) + du(work / "published" / f"{run.name}.previous")
    if not run.ok:
        run.tail = Path(run.log).read_text(errors="replace").splitlines()[-TAIL:]
    print(
        f"  {run.name}: exit {run.exit_code}, {run.seconds} s, report error: {run.report_error}, "
        f"run folder {run.run_dir_bytes / 2**20:.1f} MiB",
        flush=True,
    )


def leftovers(
    before: dict[int, tuple[float, str]],
    t0: float,
    seen: dict[tuple[int, float], str],
    patterns: re.Pattern[str],
    ours: dict[str, str],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Processes alive now that the soak started: a sampled descendant of a flow, or a new
    process whose command line matches the patterns. Those of the second kind count as the
    soak's only when their environment carries the soak's folders (`ours`); the others are
    other work on this machine, listed apart."""
    leaked, unrelated = [], []
    for pid, (created, cmdline) in process_table().items():
        if pid == os.getpid() or (pid in before and before[pid][0] == created):
            continue
        descendant = (pid, created) in seen
        if not (descendant or (created >= t0 and patterns.search(cmdline))):
            continue
        entry: dict[str, Any] = {"pid": pid, "cmdline": cmdline, "descendant_of_a_flow": descendant}
        try:
            p = psutil.Process(pid)
            environ = p.environ()
            entry |= {
                "ppid": p.ppid(),
                "status": p.status(),
                "rss_mb": round(p.memory_info().rss / 2**20, 1),
                "fds": p.num_fds(),
                "open_files": [f.path for f in p.open_files()],
            }
        except psutil.Error as e:
            environ, entry["inspect_error"] = {}, type(e).__name__
        if descendant or any(environ.get(k) == v for k, v in ours.items()):
            leaked.append(entry)
        else:
            unrelated.append(entry)
    return leaked, unrelated


def temp_entries(tmp: Path, exclude: Path) -> dict[str, float]:
    """Top-level entries of the system temp dir and their modification times."""
    out = {}
    for p in tmp.iterdir():
        if p != exclude:
            try:
                out[p.name] = p.lstat().st_mtime
            except OSError:
                pass
    return out


def new_files(place: Path, t0: float, depth: int) -> dict[str, int]:
    """Bytes of files modified since t0 under a place, by their folder `depth` levels down."""
    out: dict[str, int] = {}
    if not place.exists():
        return out
    for root, _, files in os.walk(place):
        for f in files:
            path = Path(root, f)
            try:
                st = path.lstat()
            except OSError:
                continue
            if st.st_mtime >= t0:
                key = str(place.joinpath(*path.relative_to(place).parts[:depth]))
                out[key] = out.get(key, 0) + st.st_size
    return out


def held_by_a_flow(path: str, opened: set[str]) -> bool:
    return any(f == path or f.startswith(path + os.sep) for f in opened)


def soak(runs: int, concurrent: int, grace_s: float) -> dict[str, Any]:
    """The soak in a temporary workspace, removed afterwards however the soak ends."""
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        return measure(runs, concurrent, grace_s, t0, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(runs: int, concurrent: int, grace_s: float, t0: float, work: Path) -> dict[str, Any]:
    tmp = Path(tempfile.gettempdir())
    runs_dir, prefect_home, flow_tmp = work / "runs", work / "prefect-home", work / "tmp"
    datasets_cache = work / "hf-datasets-cache"
    (work / "logs").mkdir()
    flow_tmp.mkdir()
    # The flows' own temp dir (what tempfile gives them) and the Hugging Face datasets cache
    # (by default ~/.cache/huggingface/datasets) are in the workspace, so what the flows leave
    # there is theirs for certain and the user's cache is untouched; the system temp dir and
    # the home-folder caches are still scanned for hard-coded paths.
    env = {
        **os.environ,
        "FINETUNE_RUNS_DIR": str(runs_dir),
        "PREFECT_HOME": str(prefect_home),
        "TMPDIR": str(flow_tmp),
        "HF_DATASETS_CACHE": str(datasets_cache),
    }
    env.pop("PREFECT_API_URL", None)  # the embedded default: each flow starts its own temporary server
    patterns = re.compile(rf"train\.py|{re.escape(str(runs_dir))}|llama|prefect[ ._]server|uvicorn", re.I)

    procs_before = process_table()
    fds_before = own_fds()
    temp_before = temp_entries(tmp, work)
    home_before = {str(p): du(p) for p in HOME_PLACES}
    load_before = os.getloadavg()

    def new_run(name: str, batch: str) -> Run:
        return Run(name, batch, str(write_spec(work, name)), str(work / "logs" / f"{name}.log"))

    outside = {"prefect_home": prefect_home, "hf_datasets_cache": datasets_cache, "flows_tmpdir": flow_tmp}
    last = {k: 0 for k in outside}
    growth: list[dict[str, Any]] = []

    def record_growth(after: str, n_runs: int) -> None:
        """What the places outside the run folders grew by since the step before."""
        now = {k: du(v) for k, v in outside.items()}
        growth.append({"after": after, "runs": n_runs, **{k: now[k] - last[k] for k in now}})
        last.update(now)

    done: list[Run] = []
    soak_start = time.perf_counter()
    with Descendants([tmp, *HOME_PLACES]) as descendants:
        print(f"{runs} flows back to back", flush=True)
        for i in range(1, runs + 1):
            run = new_run(f"soak-seq-{i}", "sequential")
            wait_all([(run, *start(run, env))])
            finish(run, runs_dir, work)
            record_growth(run.name, 1)
            done.append(run)
        prefect_after_sequential = du(prefect_home)
        print(f"{concurrent} flows at once", flush=True)
        batch = [new_run(f"soak-par-{i}", "concurrent") for i in range(1, concurrent + 1)]
        batch_start = time.perf_counter()
        started = [(run, *start(run, env)) for run in batch]
        wait_all(started)
        for run in batch:
            finish(run, runs_dir, work)
        record_growth("the concurrent batch", len(batch))
        batch_s = time.perf_counter() - batch_start
        done += batch
    soak_s = time.perf_counter() - soak_start

    ours = {"FINETUNE_RUNS_DIR": str(runs_dir), "PREFECT_HOME": str(prefect_home)}
    left, unrelated = leftovers(procs_before, t0, descendants.seen, patterns, ours)
    waited = 0.0
    while left and waited < grace_s:  # a server stopping at exit may take a moment
        time.sleep(1)
        waited += 1
        left, unrelated = leftovers(procs_before, t0, descendants.seen, patterns, ours)

    fds_after = own_fds()
    temp_after = temp_entries(tmp, work)
    temp_left = [
        {
            "path": str(tmp / n),
            "bytes": du(tmp / n),
            "new": n not in temp_before,
            "held_open_by_a_flow": held_by_a_flow(str(tmp / n), descendants.open_files),
        }
        for n, m in sorted(temp_after.items())
        if m >= t0 and (n not in temp_before or m != temp_before[n])
    ]
    flow_tmp_left = {str(p): du(p) for p in sorted(flow_tmp.iterdir())}
    home_new = {
        k: {"bytes": v, "held_open_by_a_flow": held_by_a_flow(k, descendants.open_files)}
        for place in HOME_PLACES
        for k, v in new_files(place, t0, depth=3).items()
    }
    home_after = {str(p): du(p) for p in HOME_PLACES}
    locks = runs_dir / ".locks"
    run_names = {r.name for r in done}
    other_in_runs = [p.name for p in runs_dir.glob("*") if p.name not in run_names and p != locks]
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "command": f"python -m benchmarks.soak --runs {runs} --concurrent {concurrent}",
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "runs": [asdict(r) | {"ok": r.ok} for r in done],
        "failures": [r.name for r in done if not r.ok],
        "soak_s": round(soak_s, 1),
        "concurrent_batch_s": round(batch_s, 1),
        "processes": {
            "descendants_seen": len(descendants.seen),
            "leaked": left,
            "unrelated_matches": unrelated,
            "waited_for_exit_s": waited,
        },
        "fds": {
            "before": len(fds_before),
            "after": len(fds_after),
            "leaked": sorted(
                f"{fd} -> {t}" for fd, t in fds_after.items() if fd not in fds_before or fds_before[fd] != t
            ),
        },
        "disk": {
            "runs_dir_bytes": du(runs_dir),
            "locks_dir_bytes": du(locks),
            "lock_files": sorted(p.name for p in locks.iterdir()) if locks.exists() else [],
            "other_in_runs_dir": other_in_runs,
            "published_bytes": du(work / "published"),
            "prefect_home_bytes_after_sequential": prefect_after_sequential,
            "prefect_home_bytes": du(prefect_home),
            "flows_tmpdir_left": flow_tmp_left,
            "hf_datasets_cache_bytes": du(datasets_cache),
            "hf_datasets_cache_entries": {
                str(p.relative_to(datasets_cache)): du(p) for p in sorted(datasets_cache.glob("*/*"))
            },
            "growth_per_step": growth,
            "system_temp_dir_changed": temp_left,
            "home_places_new_files": home_new,
            "home_places_growth_bytes": {k: home_after[k] - home_before[k] for k in home_after},
        },
    }
    return result


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def name_pattern(path: str) -> str:
    """A temp entry's name with tempfile's random part starred, to group other work's files."""
    name = re.sub(r"-[0-9a-f]{8}-", "-*-", Path(path).name)
    return re.sub(r"(?<=[-_.])[a-z0-9_]{8}$", "*", name)


def disk_leaks(d: dict[str, Any]) -> dict[str, int]:
    """What a flow left outside the workspace's run and publish folders, traced to the flows."""
    out = dict(d["flows_tmpdir_left"])
    if d["hf_datasets_cache_bytes"]:
        out["HF datasets cache (HF_DATASETS_CACHE, by default ~/.cache/huggingface/datasets)"] = d[
            "hf_datasets_cache_bytes"
        ]
    out |= {k: v["bytes"] for k, v in d["home_places_new_files"].items()}
    out |= {x["path"]: x["bytes"] for x in d["system_temp_dir_changed"] if x["held_open_by_a_flow"]}
    return out


def to_markdown(r: dict[str, Any]) -> str:
    m, d, runs = r["machine"], r["disk"], r["runs"]
    seq = [x for x in runs if x["batch"] == "sequential"]
    par = [x for x in runs if x["batch"] == "concurrent"]
    leaked_fds, leaked_procs = r["fds"]["leaked"], r["processes"]["leaked"]
    leaks, n = disk_leaks(d), max(len(runs), 1)
    traced = {k for k, v in d["home_places_new_files"].items() if v["held_open_by_a_flow"]}
    traced |= {x["path"] for x in d["system_temp_dir_changed"] if x["held_open_by_a_flow"]}
    untraced: dict[str, list[int]] = {}
    for x in d["system_temp_dir_changed"]:
        if not x["held_open_by_a_flow"]:
            untraced.setdefault(name_pattern(x["path"]), []).append(x["bytes"])

    def mean(xs: list[float]) -> str:
        return f"{sum(xs) / len(xs):.1f}" if xs else "-"

    lines = [
        f"# Soak: {len(seq)} tiny SFT flows back to back, then {len(par)} at once",
        "",
        f"Measured {r['date']} on {m['cpus']} CPU cores ({m['processor']}), {m['memory_gb']} GB of memory, "
        f"{m['platform']}, Python {m['python']}; load average {m['load_average_before'][0]} before, "
        f"{m['load_average_after'][0]} after (other work may share the CPU).",
        "",
        f"Reproduce: `{r['command']}`. Each flow is `python -m flows.sft --spec` a copy of "
        "`examples/sft-tiny.yaml` with its own `name` and its own publish folder (the publish lock "
        "fails a second flow on the same target at once, by design, so a shared target would fail the "
        "concurrent batch on purpose). FINETUNE_RUNS_DIR, PREFECT_HOME (one, shared by all flows, with "
        "each flow's temporary Prefect server on it), TMPDIR and HF_DATASETS_CACHE are in a temporary workspace, removed "
        "afterwards; the system temp dir and the home-folder caches are scanned for what the flows left.",
        "",
        "| target | measured |",
        "|---|---|",
        f"| failed flows: 0 | {len(r['failures'])}{': ' + ', '.join(r['failures']) if r['failures'] else ''} |",
        f"| leaked processes: 0 | {len(leaked_procs)} ({r['processes']['descendants_seen']} processes started "
        "by the flows, sampled every 0.5 s) |",
        f"| leaked file descriptors (this process): 0 | {len(leaked_fds)} ({r['fds']['before']} before, "
        f"{r['fds']['after']} after) |",
        f"| disk left outside the run and publish folders: 0 | {mib(sum(leaks.values()))} "
        f"({mib(sum(leaks.values()) // n)} per run) in {len(leaks)} places |",
        "",
        "| run | batch | exit | wall s | report.json error | run folder | published |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {x['name']} | {x['batch']} | {x['exit_code']} | {x['seconds']} | {x['report_error'] or 'none'} | "
            f"{mib(x['run_dir_bytes'])} | {mib(x['published_bytes'])} |"
            for x in runs
        ),
        "",
        f"Wall time: sequential mean {mean([x['seconds'] for x in seq])} s per flow; the concurrent batch "
        f"{r['concurrent_batch_s']} s in all (mean {mean([x['seconds'] for x in par])} s per flow); "
        f"the whole soak {r['soak_s']} s.",
        "",
        "## Disk",
        "",
        "Growth outside the run folders, step by step:",
        "",
        "| after | runs | PREFECT_HOME | HF datasets cache | flows' TMPDIR |",
        "|---|---|---|---|---|",
        *(
            f"| {g['after']} | {g['runs']} | {g['prefect_home']:+,} B | {g['hf_datasets_cache']:+,} B | "
            f"{g['flows_tmpdir']:+,} B |"
            for g in d["growth_per_step"]
        ),
        "",
        f"- runs folder: {mib(d['runs_dir_bytes'])} in all, {mib(d['runs_dir_bytes'] // n)} per run; "
        f"`.locks/` {d['locks_dir_bytes']} bytes in {len(d['lock_files'])} lock files (one per run name and "
        f"publish target; flock files, kept by design); other entries: {d['other_in_runs_dir'] or 'none'}",
        f"- published folders: {mib(d['published_bytes'])} ({mib(d['published_bytes'] // n)} per run)",
        f"- PREFECT_HOME: {mib(d['prefect_home_bytes_after_sequential'])} after the sequential flows, "
        f"{mib(d['prefect_home_bytes'])} at the end ({mib(d['prefect_home_bytes'] // n)} per run: the "
        "flow-run history in its database)",
        "- the flows' TMPDIR, left: "
        + (", ".join(f"`{Path(k).name}` {v:,} bytes" for k, v in d["flows_tmpdir_left"].items()) or "nothing"),
        f"- HF datasets cache: {mib(d['hf_datasets_cache_bytes'])} in {len(d['hf_datasets_cache_entries'])} "
        f"entries for {len(runs)} runs ({mib(d['hf_datasets_cache_bytes'] // n)} per run)",
        "- home-folder places, growth: "
        + ", ".join(f"`{k}` {v:+,} bytes" for k, v in d["home_places_growth_bytes"].items()),
        "- left by the flows outside the run folders: "
        + (
            "; ".join(
                f"`{k}` {v:,} bytes{' (seen open in a flow)' if k in traced else ''}" for k, v in sorted(leaks.items())
            )
            or "nothing"
        ),
        "- system temp dir entries new or changed during the soak that no flow was seen holding open "
        "(other work on this machine, or a flow's file opened and closed between samples): "
        + ("; ".join(f"`{k}` x{len(v)} ({mib(sum(v))})" for k, v in sorted(untraced.items())) or "none"),
    ]
    if leaked_procs:
        lines += ["", "## Leaked processes", ""]
        lines += [
            f"- pid {p['pid']} (parent {p.get('ppid')}, {p.get('status')}, {p.get('fds')} fds): `{p['cmdline']}`"
            for p in leaked_procs
        ]
    if r["processes"]["unrelated_matches"]:
        lines += [
            "",
            "Processes that match the patterns but are not the soak's (not its descendants, not its folders):",
        ]
        lines += [f"- pid {p['pid']}: `{p['cmdline'][:160]}`" for p in r["processes"]["unrelated_matches"]]
    if leaked_fds:
        lines += ["", "## Leaked file descriptors", "", *(f"- {x}" for x in leaked_fds)]
    failed = [x for x in runs if not x["ok"]]
    for x in failed:
        lines += ["", f"## Failure: {x['name']}", "", *(f"- {s}" for s in x["failed_stages"]), "", "```"]
        lines += [*x["tail"], "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="flows run back to back")
    p.add_argument("--concurrent", type=int, default=3, help="flows run at once, after those")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="folder for soak.md and .json")
    p.add_argument("--grace", type=float, default=10.0, help="seconds a leftover process may take to exit")
    args = p.parse_args()
    result = soak(args.runs, args.concurrent, args.grace)
    result["command"] = shlex.join(["python", "-m", "benchmarks.soak", *sys.argv[1:]])
    args.out.mkdir(parents=True, exist_ok=True)
    text = to_markdown(result)
    (args.out / "soak.md").write_text(text)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2))
    print(text)


if __name__ == "__main__":
    main()
