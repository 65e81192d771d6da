"""Loading a dataset into a DataFrame whose index is the row number a user can find.

JSONL is parsed line by line (not through ``datasets``) so a broken line is reported by its
line number; the DataFrame index is the line number for JSONL and the 1-based record
number for JSON, CSV and Parquet. Hub ids and folders go through ``datasets``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from tasks.errors import UserFacingError

LOCAL_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DatasetLoadError(UserFacingError, ValueError):
    """The dataset could not be read at all; the message says where and why."""


def _read_jsonl(path: Path) -> pd.DataFrame:
    records, index, broken = [], [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                broken.append(f"line {lineno}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(value, dict):
                broken.append(f"line {lineno}: expected a JSON object, got {type(value).__name__}")
                continue
            records.append(value)
            index.append(lineno)
    if broken:
        shown = "\n  - ".join(broken[:20])
        more = f"\n  ... and {len(broken) - 20} more" if len(broken) > 20 else ""
        raise DatasetLoadError(f"{path}: {len(broken)} unreadable line(s):\n  - {shown}{more}")
    return pd.DataFrame.from_records(records, index=pd.Index(index, name="row"))


def _one_based(df: pd.DataFrame) -> pd.DataFrame:
    df = df.reset_index(drop=True)
    df.index = pd.Index(range(1, len(df) + 1), name="row")
    return df


def _load_refusal(source: str, split: str, local: bool, e: Exception) -> DatasetLoadError:
    from tasks.faults import hub_read_failure

    where = "local folder" if local else "Hub dataset"
    why = hub_read_failure(e, "dataset", "HF_DATASETS_OFFLINE", "set HF_TOKEN to a token with access")
    return DatasetLoadError(
        f"could not load {where} '{source}' (split '{split}'): {why}. "
        "If you are offline, point 'dataset' at a local .jsonl/.json/.csv/.parquet file."
    )


def load_frame(source: str, split: str = "train") -> pd.DataFrame:
    """Read a local file (jsonl/json/csv/parquet), a local dataset folder or a Hub dataset id."""
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        try:
            if suffix == ".jsonl":
                return _read_jsonl(path)
            if suffix == ".json":
                data = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(data, dict) and split in data:
                    data = data[split]
                if not isinstance(data, list):
                    raise DatasetLoadError(f"{path}: expected a JSON list of records (or JSONL)")
                return _one_based(pd.DataFrame.from_records(data))
            if suffix == ".csv":
                return _one_based(pd.read_csv(path, keep_default_na=False, na_values=[]))
            if suffix == ".parquet":
                return _one_based(pd.read_parquet(path))
        except DatasetLoadError:
            raise
        except (ValueError, OSError) as e:
            raise DatasetLoadError(f"{path}: could not be read as {suffix[1:]}: {e}") from None
        raise DatasetLoadError(
            f"{path}: unsupported file type '{suffix}'; use one of {', '.join(sorted(LOCAL_SUFFIXES))}"
        )
    looks_local = path.is_absolute() or source.startswith(".") or path.suffix.lower() in LOCAL_SUFFIXES
    if path.is_dir() or (not looks_local and HUB_ID.match(source)):
        from datasets import load_dataset

        from tasks.faults import read_with_retries

        try:
            ds = read_with_retries(
                lambda: load_dataset(str(path) if path.is_dir() else source, split=split),
                f"dataset {source}",
                local=path.is_dir(),
            )
        except Exception as e:  # datasets raises many types; the kind and message matter
            raise _load_refusal(source, split, path.is_dir(), e) from None
        return _one_based(ds.to_pandas())
    raise DatasetLoadError(f"dataset '{source}' was not found: no such file, and not a Hub id of the form 'owner/name'")
