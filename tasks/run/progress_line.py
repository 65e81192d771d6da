"""The structured progress line a training script prints once per logging step.

One format for every backend: a local process writes it to its log file, a Hugging Face
job to its log stream, and the monitor reads the same lines from either. The generated
script prints them itself (it imports nothing from this repo), so the format is fixed
here and checked by a test that runs the script.

    FINETUNE_PROGRESS {"event": "log", "step": 20, "total": 48, "epoch": 0.4, "loss": 1.9,
                       "metrics": {"train/loss": 1.9, ...}, "tokens_per_s": 812.0, "elapsed_s": 14.2}
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PREFIX = "FINETUNE_PROGRESS "
# Cloud log streams may prefix each line (a timestamp, a replica name): find the marker anywhere.
_LINE = re.compile(re.escape(PREFIX) + r"(\{.*\})\s*$")


class ProgressLine(BaseModel):
    model_config = ConfigDict(frozen=True)

    event: Literal["start", "log", "replay", "end"] = "log"  # replay: a resumed run's curve so far
    step: int = Field(ge=0)
    total: int | None = None
    epoch: float | None = None
    loss: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    tokens_per_s: float | None = None
    elapsed_s: float = 0.0


def parse_progress_line(line: str) -> ProgressLine | None:
    """The progress record on this log line, or None for any other line (or a garbled one)."""
    if PREFIX not in line:
        return None
    m = _LINE.search(line)
    if m is None:
        return None
    try:
        return ProgressLine.model_validate(json.loads(m.group(1)))
    except (ValueError, ValidationError):
        return None
