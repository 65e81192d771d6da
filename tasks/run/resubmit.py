"""A safer plan for a job that ran out of GPU memory: the same global batch in smaller pieces.

Halving the micro-batch (doubling accumulation) roughly halves activation memory without
changing what is learnt per optimizer step; gradient checkpointing trades compute for the
rest. The job resumes from its last pushed checkpoint, so the steps already paid for stay.
"""

from __future__ import annotations

import math
from typing import Any


def safer_training(training: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """(new training arguments, what changed), or None when nothing safer is left to try."""
    batch = int(training.get("per_device_train_batch_size", 1))
    accumulation = int(training.get("gradient_accumulation_steps", 1))
    checkpointing = bool(training.get("gradient_checkpointing", False))
    if batch <= 1 and checkpointing:
        return None
    new_batch = max(1, batch // 2)
    new_accumulation = math.ceil(batch * accumulation / new_batch)
    safer = {
        **training,
        "per_device_train_batch_size": new_batch,
        "gradient_accumulation_steps": new_accumulation,
        "gradient_checkpointing": True,
    }
    changes = []
    if new_batch != batch:
        changes.append(
            f"micro-batch {batch} -> {new_batch} with accumulation {accumulation} -> {new_accumulation} "
            f"(global batch {batch * accumulation} -> {new_batch * new_accumulation})"
        )
    if not checkpointing:
        changes.append("gradient checkpointing on")
    return safer, ", ".join(changes)
