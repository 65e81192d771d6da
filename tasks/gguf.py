"""Stage 9: GGUF conversion and quantization.

Not built yet: llama.cpp's converter is not wired in. The stage reports itself as skipped,
naming what was asked for, so no run claims GGUF files it does not have.
"""

from __future__ import annotations

from tasks.models import GgufFiles, JobResult, StageOutcome
from tasks.spec import Outputs


def convert_gguf(result: JobResult, outputs: Outputs) -> GgufFiles:
    if not outputs.gguf:
        return GgufFiles(outcome=StageOutcome(stage="convert_gguf", status="skipped", detail="outputs.gguf is empty"))
    return GgufFiles(
        outcome=StageOutcome(
            stage="convert_gguf",
            status="skipped",
            detail=(
                "GGUF conversion is not available yet (llama.cpp's converter is not wired in); "
                f"requested types {', '.join(outputs.gguf)} were not produced"
            ),
        )
    )
