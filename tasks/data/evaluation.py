"""The rows a run is evaluated on when the spec names its own evaluation dataset or split:
checked like the training rows, sampled with the spec's seed."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tasks.core.atomic import write_text
from tasks.core.methods import MethodDefinition
from tasks.core.models import DatasetReport
from tasks.core.spec import RunSpec
from tasks.data.validate import HeldOut, validate_dataset
from tasks.data.vision import planning_inputs


def has_evaluation_set(spec: RunSpec) -> bool:
    """Whether the spec names its own evaluation dataset or split (instead of holding rows out)."""
    return bool(spec.evaluation.dataset or spec.evaluation.split)


def with_evaluation_rows(
    spec: RunSpec, method: MethodDefinition, model_path: str, report: DatasetReport, args: dict[str, Any]
) -> DatasetReport:
    """The evaluation rows from the spec's evaluation dataset or split, checked like the training
    rows (same format, columns and conversion) and sampled with the spec's seed."""

    source = spec.evaluation.dataset or spec.dataset
    split = spec.evaluation.split or "train"
    out = Path(report.prepared_path).parent
    tokenizer, inputs = planning_inputs(model_path, args.get("chat_template_path"))
    checked = validate_dataset(
        source,
        method,
        tokenizer,
        report.max_length,
        out / "evaluation",
        split,
        dict(spec.columns),
        spec.conversion,
        HeldOut(share=0),
        inputs,
    )
    lines = Path(checked.prepared_path).read_text(encoding="utf-8").splitlines()
    if checked.images:  # its images were staged beside its own rows, a folder below the held-out file's
        lines = [_images_under(line, out / "evaluation", out) for line in lines]
    keep = sorted(random.Random(spec.seed).sample(range(len(lines)), min(len(lines), spec.evaluation.held_out_max)))
    write_text(Path(report.heldout_path), "".join(lines[i] + "\n" for i in keep))
    where = f"{source} (split {split})"
    return report.model_copy(
        update={
            "heldout_rows": len(keep),
            "heldout_source": f"{len(keep)} of the {len(lines)} rows of {where}, chosen with seed {spec.seed}",
            "warnings": [*report.warnings, f"evaluation rows: {len(keep)} of {len(lines)} from {where}"],
        }
    )


def _images_under(line: str, staged_from: Path, heldout_dir: Path) -> str:
    row = json.loads(line)
    row["images"] = [str((staged_from / p).relative_to(heldout_dir)) for p in row["images"]]
    return json.dumps(row)


def is_conversational(report: DatasetReport) -> bool:
    """Whether the prepared rows are chat messages (chat models are evaluated in their template)."""
    if report.format in ("messages", "vision", "implicit_preference"):
        return True
    try:
        first = json.loads(Path(report.prepared_path).read_text(encoding="utf-8").split("\n", 1)[0])
    except (OSError, ValueError):
        return False
    return isinstance(first.get("prompt"), list)
