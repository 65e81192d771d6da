"""`python -m flows.inspect DATASET [--method M] [--split S] [--json]`: what a dataset is and
what each method needs to train on it (READY / NEEDS MAPPING with the spec lines to paste /
INCOMPATIBLE), read without a model, a plan or a Prefect server."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tasks.core.errors import UserFacingError
from tasks.core.methods import METHODS
from tasks.data.formats import recognise
from tasks.data.reading import LineBlock, UnreadableLines, iter_blocks, parse_block


def _read(source: str, split: str) -> tuple[list[dict], int, list[str]]:
    """The first rows (what recognition judges), the row count and the columns, streaming:
    only the first block is parsed, the rest of a JSONL file is counted by its lines."""
    from tasks.data.validate import sample_records

    unreadable = UnreadableLines(Path(source))
    sample: list[dict] = []
    columns: list[str] = []
    count = 0
    for block in iter_blocks(source, split):
        if isinstance(block, LineBlock):
            if sample:
                count += sum(1 for line in block.data.split(b"\n") if line.strip())
                continue
            block = parse_block(block, unreadable)
        if not sample:
            sample, columns = sample_records(block), [str(c) for c in block.columns]
        count += len(block)
    unreadable.raise_if_any()
    return sample, count, columns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.inspect", description=__doc__)
    parser.add_argument("dataset", help="a .jsonl/.json/.csv/.parquet file, a dataset folder or a Hub id")
    parser.add_argument("--method", choices=sorted(METHODS), help="only this method's verdict")
    parser.add_argument("--split", default="train")
    parser.add_argument("--json", action="store_true", help="machine-readable, for agents")
    args = parser.parse_args(argv)
    try:
        rows, count, columns = _read(args.dataset, args.split)
    except UserFacingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    methods = [args.method] if args.method else list(METHODS)
    verdicts = [recognise(rows, m) for m in methods]
    if args.json:
        payload = {
            "dataset": args.dataset,
            "rows": count,
            "columns": columns,
            "verdicts": [
                {**v.model_dump(), "spec_lines": [c.spec_lines() for c in v.candidates if c.verdict != "READY"]}
                for v in verdicts
            ],
        }
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return 0
    print(f"{args.dataset}: {count} rows, columns {', '.join(columns)}")
    for v in verdicts:
        print(v.text())
    return 0
