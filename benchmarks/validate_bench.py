"""Dataset validation at scale: rows per minute and peak memory, streaming against the
previous whole-file validator, side by side on the same files in one run.

    python -m benchmarks.validate_bench [--rows 200000,1000000,5000000] [--baseline-max 1000000]

The data is short chat rows from the repo's generator (`training.example_data.chat_rows_at_scale`:
1-3 exchanges, a system turn in 3 of 10 rows, about 380 bytes a row), written once per size to a
temporary folder. Each measurement is a fresh process, sampled every 0.25 s with psutil for the
peak memory of the process itself (RSS) and of its whole tree, the validation workers included
(the sum of their proportional set sizes: a page they share is counted once in all).

- `dry-run`: `python -m flows.sft --spec S --dry-run`, as a user runs it (imports, Prefect, the
  tiny model's tokenizer, validation, planning, the script); `backend: hf-jobs`, so the plan of
  millions of rows is priced rather than refused for this CPU's 24-hour limit. No network.
- `validate`: `tasks.data.validate.validate_dataset` alone, with the workers (every core) and with
  `FINETUNE_VALIDATE_WORKERS=0` (this process only).
- `baseline dry-run`: the same dry-run on the code of BASELINE_REV (the whole file read into one
  DataFrame, pandera element-wise checks), checked out with `git worktree` beside this one; run
  up to --baseline-max rows (it holds every row in memory).

Every row is schema-checked in every variant; token statistics come from a sample (10k rows now,
the first 20k rows in the baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
BASELINE_REV = "8ce132d"  # the last commit before validation streamed
TARGET_ROWS_PER_MIN = 3_000_000
TARGET_PEAK_GB = 1.0

VALIDATE_ONLY = """
import sys
from pathlib import Path
from tasks.core.methods import SFT
from tasks.core.model_source import load_tokenizer
from tasks.data.validate import validate_dataset
from training.tiny_model import ensure_tiny_model

if __name__ == "__main__":
    tok = load_tokenizer(str(ensure_tiny_model()))
    report = validate_dataset(sys.argv[1], SFT, tok, 512, Path(sys.argv[2]))
    print("CHECK_SECONDS", report.check_seconds)
"""


def measure(cmd: list[str], env: dict[str, str], cwd: Path) -> dict[str, float]:
    """Wall time and peak RSS (the process, and the sum over its tree) of one command."""
    start = time.perf_counter()
    proc = psutil.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak_main = peak_tree = 0
    while proc.poll() is None:
        try:
            main = proc.memory_info().rss
            # proportional set size: each shared page divided among the processes that map it,
            # so the sum is the memory the tree really holds
            tree = sum(p.memory_full_info().pss for p in [proc, *proc.children(recursive=True)])
        except psutil.Error:
            continue
        peak_main, peak_tree = max(peak_main, main), max(peak_tree, tree)
        time.sleep(0.25)
    wall = time.perf_counter() - start
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    check = re.search(r"CHECK_SECONDS ([\d.]+)|\"check_seconds\": ([\d.]+)", out)
    return {
        "check_seconds": float(check[1] or check[2]) if check else None,
        "seconds": round(wall, 1),
        "peak_main_gb": round(peak_main / 2**30, 3),
        "peak_tree_gb": round(peak_tree / 2**30, 3),
    }


def readers(data: Path, rows: int = 100_000) -> list[dict]:
    """Rows/s of reading and checking the first `rows` rows in this one process, by reader: the
    per-line orjson reader validation uses, and Arrow's JSON reader feeding the same pandera
    checks (polars too when installed); and whether each locates a row whose content has
    another type (`"content": 42`) by its line."""
    import io

    import pandas as pd
    import pyarrow.json as pj

    from tasks.core.methods import SFT
    from tasks.data.reading import LineBlock
    from tasks.data.schemas import plain, schema_for, with_turn_codes
    from tasks.data.validate import BlockJob, check_block

    text = b"".join(line for _, line in zip(range(rows), data.open("rb"), strict=False))
    job = BlockJob(str(data), SFT, {}, None, "messages", ["messages"], ["messages"])
    blocks = [LineBlock(1 + i, b"\n".join(text.split(b"\n")[i : i + 10_000])) for i in range(0, rows, 10_000)]

    def ours() -> None:
        for b in blocks:
            check_block(b, job)

    def arrow() -> None:
        for b in blocks:
            df = pj.read_json(io.BytesIO(b.data)).to_pandas().map(plain)
            schema_for("messages").validate(with_turn_codes(df), lazy=True)

    variants = {"orjson per line + pandera (validation)": ours, "Arrow JSON reader + the same pandera checks": arrow}
    try:
        import polars as pl

        def polars() -> None:
            for b in blocks:
                df = pl.read_ndjson(io.BytesIO(b.data)).to_pandas().map(plain)
                schema_for("messages").validate(with_turn_codes(df), lazy=True)

        variants["polars read_ndjson + the same pandera checks"] = polars
    except ImportError:
        pass
    odd = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]}\n' * 3
    odd += b'{"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "a"}]}\n'
    out = []
    for name, fn in variants.items():
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        if name.startswith("orjson"):
            result = check_block(LineBlock(1, odd), job)
            rows_found = [r for e in result.failures.rules.values() for r in e["rows"]]
            located = f"located: line {', '.join(map(str, rows_found))}, the rest checked"
        else:
            try:
                reader = pj.read_json if name.startswith("Arrow") else pl.read_ndjson  # noqa: F821
                reader(io.BytesIO(odd))
                located = "not refused: the value was read"
            except Exception as e:  # each reader fails in its own way; what it says is the point
                located = f"refused the whole block: {str(e)[:90]}"
        out.append({"reader": name, "rows": rows, "rows_per_s": round(rows / seconds), "mixed_types": located})
        print(json.dumps(out[-1]), flush=True)
    del pd
    return out


def write_spec(folder: Path, data: Path, name: str) -> Path:
    spec = (REPO / "examples" / "sft-tiny.yaml").read_text()
    spec = spec.replace("dataset: data/sft_chat.jsonl", f"dataset: {data}").replace(
        "backend: local", "backend: hf-jobs"
    )
    spec = spec.replace("max_length: 128", "max_length: 512")
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\n" + spec)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.validate_bench", description=__doc__)
    parser.add_argument("--rows", default="200000,1000000,5000000")
    parser.add_argument("--baseline-max", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--readers-only", action="store_true", help="only the reader comparison (one process)")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.rows.split(",")]

    from training.example_data import chat_rows_at_scale, write_jsonl_stream
    from training.tiny_model import ensure_tiny_model

    ensure_tiny_model()  # built once, outside the timings
    work = Path(tempfile.mkdtemp(prefix="validate-bench-"))
    baseline = work / "baseline"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(baseline), BASELINE_REV], cwd=REPO, check=True, capture_output=True
    )
    env = {
        **os.environ,
        "FINETUNE_RUNS_DIR": str(work / "runs"),
        "PREFECT_HOME": str(work / "prefect"),
        "TOKENIZERS_PARALLELISM": "true",
    }
    env.pop("FINETUNE_VALIDATE_WORKERS", None)
    (work / "validate_only.py").write_text(VALIDATE_ONLY)
    python = sys.executable
    results: list[dict] = []
    reader_results: list[dict] = []
    try:
        for n in sizes:
            data = work / f"chat_{n}.jsonl"
            write_jsonl_stream(chat_rows_at_scale(n), data)
            size_mb = data.stat().st_size / 2**20
            if not reader_results:
                reader_results = readers(data, min(n, 100_000))
                if args.readers_only:
                    break
            runs = {
                "dry-run": (
                    [python, "-m", "flows.sft", "--spec", str(write_spec(work, data, f"b{n}")), "--dry-run", "--json"],
                    env,
                    REPO,
                ),
                "validate, workers": (
                    [python, str(work / "validate_only.py"), str(data), str(work / "out")],
                    env,
                    REPO,
                ),
                "validate, 1 process": (
                    [python, str(work / "validate_only.py"), str(data), str(work / "out")],
                    {**env, "FINETUNE_VALIDATE_WORKERS": "0"},
                    REPO,
                ),
            }
            if n <= args.baseline_max:
                spec = write_spec(work, data, f"base{n}")
                runs["baseline dry-run"] = (
                    [python, "-m", "flows.sft", "--spec", str(spec), "--dry-run", "--json"],
                    {**env, "PYTHONPATH": str(baseline)},
                    baseline,
                )
            for variant, (cmd, run_env, cwd) in runs.items():
                m = measure(cmd, run_env, cwd)
                m.update(rows=n, file_mb=round(size_mb), variant=variant, rows_per_min=round(n / m["seconds"] * 60))
                if m["check_seconds"]:
                    m["checked_rows_per_min"] = round(n / m["check_seconds"] * 60)
                results.append(m)
                print(json.dumps(m), flush=True)
            data.unlink()
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    write_results(results, reader_results, args.out)
    return 0


def write_results(results: list[dict], reader_results: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = (
        f"{psutil.cpu_count()} CPU cores ({platform.machine()}), "
        f"{psutil.virtual_memory().total / 2**30:.1f} GB of memory, Python {platform.python_version()}"
    )
    (out / "validate.json").write_text(
        json.dumps({"measured": when, "machine": machine, "results": results, "readers": reader_results}, indent=2)
    )
    lines = [
        "# Dataset validation at scale: streaming against the whole-file validator",
        "",
        f"Measured {when} on {machine}.",
        "",
        "Reproduce: `python -m benchmarks.validate_bench` (sizes with `--rows`). Short chat rows from "
        "`training.example_data.chat_rows_at_scale`; every row schema-checked; each figure a fresh process. "
        "Peak memory is the process's own RSS and, for the tree, the sum of the proportional set sizes (PSS) "
        f"of it and its validation workers (a shared page counted once). Baseline: commit {BASELINE_REV}, the whole file in one DataFrame.",
        "",
        f"Targets: at least {TARGET_ROWS_PER_MIN / 1e6:.0f}M rows/min; peak under {TARGET_PEAK_GB:.0f} GB "
        "whatever the size.",
        "",
        "`seconds` is the whole process (start, imports, tokenizer, validation, and for a dry-run the plan); "
        "`check s` is reading and schema-checking every row, as the dataset report states it (`check_seconds`; "
        "the baseline does not report it).",
        "",
        "| rows | file MB | variant | seconds | rows/min | check s | checked rows/min | peak, process GB | peak, tree GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        checked = f"{r['checked_rows_per_min'] / 1e6:.2f}M" if r.get("checked_rows_per_min") else "-"
        lines.append(
            f"| {r['rows']:,} | {r['file_mb']} | {r['variant']} | {r['seconds']} | {r['rows_per_min'] / 1e6:.2f}M | "
            f"{r['check_seconds'] or '-'} | {checked} | {r['peak_main_gb']} | {r['peak_tree_gb']} |"
        )
    by = {(r["rows"], r["variant"]): r for r in results}
    ratios = []
    for n in sorted({r["rows"] for r in results}):
        new, old = by.get((n, "dry-run")), by.get((n, "baseline dry-run"))
        if new and old:
            ratios.append(
                f"- {n:,} rows: dry-run {old['seconds'] / new['seconds']:.2f}x faster, peak process "
                f"memory {old['peak_main_gb'] / new['peak_main_gb']:.2f}x lower than the baseline"
            )
    if ratios:
        lines += ["", "Ratios, measured side by side in this run:", "", *ratios]
    if reader_results:
        base = reader_results[0]["rows_per_s"]
        lines += [
            "",
            f"Readers, one process, the first {reader_results[0]['rows']:,} rows, side by side in this run "
            "(reading and the same checks; a row whose `content` is 42 among strings decides whether a reader can "
            "locate bad rows):",
            "",
            "| reader | rows/s | ratio | a mixed-type row |",
            "|---|---|---|---|",
            *(
                f"| {r['reader']} | {r['rows_per_s']:,} | {r['rows_per_s'] / base:.2f}x | {r['mixed_types']} |"
                for r in reader_results
            ),
        ]
        if not any(r["reader"].startswith("polars") for r in reader_results):
            lines.append("\npolars is not installed here (it is not a dependency): `pip install polars` adds its row.")
    (out / "validate.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
