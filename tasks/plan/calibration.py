"""Estimates that learn: measured runs correct the planner's time and memory models.

Every finished run records what its training took (the script measures it) next to what the
plan estimated (report.json). `python -m flows.calibrate` reads those reports and writes a
table of correction factors per (flavor, model family, training mode): the median over runs of
measured / estimated training time and peak memory, against the uncorrected model (a run
planned with a factor has it divided out, so factors do not compound). The planner multiplies
its estimates by the factor of the same key, and says so in the plan.

The table is a JSON file: FINETUNE_CALIBRATION_FILE, or calibration.json in the cache folder.
"""

from __future__ import annotations

import json
import os
import statistics
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.core.atomic import write_text
from training.tiny_model import cache_root

MIN_FACTOR, MAX_FACTOR = 0.25, 4.0  # a factor outside this says the run was unlike its plan, not a bias


class Correction(BaseModel):
    model_config = ConfigDict(frozen=True)

    flavor: str
    family: str
    mode: str
    runs: int
    time_factor: float = Field(description="measured / estimated training time (median over runs)")
    memory_factor: float = Field(description="measured / estimated peak memory (median over runs)")
    run_names: list[str] = Field(default_factory=list)


class CalibrationTable(BaseModel):
    model_config = ConfigDict(frozen=True)

    updated: str = ""
    source: str = ""
    corrections: list[Correction] = Field(default_factory=list)

    def find(self, flavor: str, family: str, mode: str) -> Correction | None:
        return next(
            (c for c in self.corrections if (c.flavor, c.family, c.mode) == (flavor, family, mode)),
            None,
        )


def table_path() -> Path:
    env = os.environ.get("FINETUNE_CALIBRATION_FILE")
    return Path(env) if env else cache_root() / "calibration.json"


def load_table() -> CalibrationTable:
    """The table, or an empty one (nothing measured yet, or an unreadable file: planning must not fail on it)."""
    path = table_path()
    try:
        return CalibrationTable.model_validate_json(path.read_text())
    except (OSError, ValidationError, ValueError):
        return CalibrationTable()


def _clamp(x: float) -> float:
    return min(MAX_FACTOR, max(MIN_FACTOR, x))


def observation(report: dict) -> tuple[tuple[str, str, str], float, float] | None:
    """(key, raw time ratio, raw memory ratio) of one finished run's report.json, or None."""
    result = (report.get("result") or {}).get("measured")
    plan = report.get("plan") or {}
    cost, hardware = plan.get("cost") or {}, plan.get("hardware") or {}
    if not result or not cost.get("compute_s") or not hardware.get("estimated_peak_memory_gb"):
        return None
    if not result.get("optimizer_steps") or result.get("train_s", 0) <= 0:
        return None
    # the estimate is for the whole run; a resumed job measured only its own part of it
    planned_steps = cost.get("optimizer_steps") or result["optimizer_steps"]
    share = min(1.0, result["optimizer_steps"] / planned_steps)
    # the time model's own figure: not a split timed on this machine, nor an earlier correction
    raw_time = (cost.get("modelled_compute_s") or cost["compute_s"] / cost.get("time_factor", 1.0)) * share
    raw_memory = hardware["estimated_peak_memory_gb"] / hardware.get("memory_factor", 1.0)
    key = (hardware.get("flavor", ""), hardware.get("model_type", ""), hardware.get("mode", ""))
    return key, result["train_s"] / raw_time, result["peak_memory_gb"] / raw_memory


def refresh(runs_root: Path) -> CalibrationTable:
    """Rebuild the table from every finished run under runs_root and write it."""
    seen: dict[tuple[str, str, str], list[tuple[str, float, float]]] = {}
    for path in sorted(runs_root.glob("*/report.json")):
        try:
            found = observation(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
        if found:
            key, t, m = found
            seen.setdefault(key, []).append((path.parent.name, t, m))
    corrections = [
        Correction(
            flavor=flavor,
            family=family,
            mode=mode,
            runs=len(obs),
            time_factor=round(_clamp(statistics.median(t for _, t, _ in obs)), 4),
            memory_factor=round(_clamp(statistics.median(m for _, _, m in obs)), 4),
            run_names=[name for name, _, _ in obs],
        )
        for (flavor, family, mode), obs in sorted(seen.items())
    ]
    table = CalibrationTable(
        updated=datetime.now(UTC).isoformat(timespec="seconds"), source=str(runs_root), corrections=corrections
    )
    write_text(table_path(), table.model_dump_json(indent=2))
    return table
