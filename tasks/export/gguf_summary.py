"""How a smoke-tested GGUF file reads in the report, the model card and the Prefect table."""

from __future__ import annotations

from tasks.core.models import GgufFile


def fallback_text(f: GgufFile) -> str:
    """ "144/290 tensors fell back: q4_K -> q5_0 x120, q6_K -> q8_0 x24" (or "none")."""
    if not f.fallback_tensors:
        return "none"
    of = f"/{f.total_tensors}" if f.total_tensors else ""
    kinds = ", ".join(f"{k} x{n}" for k, n in sorted(f.fallbacks.items(), key=lambda kv: -kv[1]))
    return f"{f.fallback_tensors}{of} tensors fell back: {kinds}"


def gguf_cells(f: GgufFile) -> tuple[str, str, str]:
    """Perplexity (HF model's in brackets), top-1 agreement and tokens/s of one smoke-tested file."""
    ppl = f"{f.perplexity:.3f} ({f.hf_perplexity:.3f})" if f.perplexity and f.hf_perplexity else "-"
    agree = f"{f.top1_agreement:.1%}" if f.top1_agreement is not None else "-"
    tps = f"{f.generation_tokens_per_s:.0f}" if f.generation_tokens_per_s else "-"
    return ppl, agree, tps
