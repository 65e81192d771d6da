"""Several lifecycles at once on one machine: each process left to its own thread count vs
each given an equal share of the cores (what tests/conftest.py gives every pytest worker).

    python -m benchmarks.thread_share [--runs 4] [--out benchmarks/results]

Each run is `python -m flows.sft --spec examples/sft-tiny.yaml` as a user starts it, all
started together, in a temporary folder (runs, publish targets, Prefect home). By default
torch and llama.cpp start one thread per core in every process; on a machine with fewer
cores than processes those threads spin-wait against each other. The benchmark prints the
wall time and the CPU time of each batch, and their ratio, measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def batch(runs: int, threads: int | None, work: Path) -> dict[str, float]:
    """`runs` SFT lifecycles started together; wall and CPU seconds of the whole batch."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "FINETUNE_RUNS_DIR": str(work / "runs")}
    env["PREFECT_HOME"] = str(work / "prefect")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flows.sft", "--spec", str(ROOT / "examples" / "sft-tiny.yaml"), "--name", f"t{i}"]
            + ["--set", f"outputs.hub_repo={work / 'published' / str(i)}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(runs)
    ]
    codes = [p.wait() for p in procs]
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if any(codes):
        raise SystemExit(f"a run failed (exit codes {codes}); see {work / 'runs'}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    share = max(1, cores() // args.runs)
    results = {}
    for label, threads in (("one thread per core in each process", None), (f"{share} thread(s) each", share)):
        work = Path(tempfile.mkdtemp(prefix="thread-share-"))
        try:
            results[label] = batch(args.runs, threads, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"{label}: {results[label]}", flush=True)
    default, shared = results.values()
    ratio = {k: round(default[k] / shared[k], 2) for k in ("wall_s", "cpu_s")}
    print(f"default / shared: wall x{ratio['wall_s']}, CPU x{ratio['cpu_s']}")
    write(args.out, args.runs, results, ratio)
    return 0


def write(out: Path, runs: int, results: dict[str, dict[str, float]], ratio: dict[str, float]) -> None:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{cores()} CPU cores, {platform.platform()}, Python {platform.python_version()}"
    rows = "\n".join(f"| {label} | {r['wall_s']} | {r['cpu_s']} |" for label, r in results.items())
    out.mkdir(parents=True, exist_ok=True)
    (out / "thread-share.json").write_text(
        json.dumps({"when": when, "runs": runs, **results, "ratio": ratio}, indent=2)
    )
    (out / "thread-share.md").write_text(
        f"# {runs} SFT lifecycles at once: threads per process\n\n"
        f"Measured {when} on {machine}. Reproduce: `python -m benchmarks.thread_share --runs {runs}`.\n\n"
        f"| threads | wall s (batch) | CPU s (batch) |\n|---|---|---|\n{rows}\n\n"
        f"Default over shared: wall x{ratio['wall_s']}, CPU x{ratio['cpu_s']}. The CPU time is what the "
        "spin-waiting costs: the same work, done by threads that mostly wait for each other.\n"
    )


if __name__ == "__main__":
    sys.exit(main())
