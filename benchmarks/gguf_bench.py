"""GGUF conversion and quantization: time and size for the tiny model and a 0.5B-size model.

    python -m benchmarks.gguf_bench [--skip-large] [--out benchmarks/results/gguf.md]

The 0.5B-size model is a random-init Qwen2 with Qwen3-0.6B's shape (hidden 1024,
intermediate 3072, 28 layers, vocab 151,936; every row a multiple of 256, so k-quants
apply) and the tiny tokenizer, the vocabulary padded by the converter. Random weights
quantize like trained ones for timing and size purposes; quality is not measured here.
Each type is converted or quantized once, on this machine, through the project's own stage
functions (the same code the flows run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from tasks.export.gguf import convert_to_gguf, quantize
from training.tiny_model import ensure_tiny_model

TYPES = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]
LARGE_SHAPE = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
}


def build_large(target: Path, tokenizer_dir: Path) -> int:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(eos_token_id=2, pad_token_id=0, **LARGE_SHAPE)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target)
    tok.save_pretrained(target)
    return sum(p.numel() for p in model.parameters())


def measure(name: str, model_dir: Path, work: Path, params: int) -> dict:
    base = work / f"{name}-f16.gguf"
    start = time.perf_counter()
    convert_to_gguf(model_dir, base, "f16", work / f"{name}-convert.log")
    rows = [
        {"type": "f16", "seconds": round(time.perf_counter() - start, 2), "mb": round(base.stat().st_size / 1e6, 2)}
    ]
    for quant in TYPES:
        out = work / f"{name}-{quant}.gguf"
        seconds, _ = quantize(base, out, quant)
        rows.append({"type": quant, "seconds": round(seconds, 2), "mb": round(out.stat().st_size / 1e6, 2)})
        out.unlink()
    base.unlink()
    safetensors_mb = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 1e6
    return {"model": name, "parameters": params, "safetensors_mb": round(safetensors_mb, 2), "rows": rows}


def to_markdown(results: list[dict]) -> str:
    lines = [
        "# GGUF conversion and quantization",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores, "
        "llama-cpp-python " + __import__("importlib.metadata").metadata.version("llama-cpp-python") + ", with "
        "`python -m benchmarks.gguf_bench`. f16 is the converter (llama.cpp's convert_hf_to_gguf.py, imports "
        "included); the others are llama-cpp-python's quantize API from that f16 file.",
        "",
    ]
    for r in results:
        lines += [
            f"## {r['model']}: {r['parameters'] / 1e6:.1f}M parameters, safetensors {r['safetensors_mb']} MB",
            "",
            "| type | seconds | size (MB) | size vs f16 |",
            "|---|---|---|---|",
        ]
        f16 = r["rows"][0]["mb"]
        lines += [f"| {x['type']} | {x['seconds']} | {x['mb']} | {x['mb'] / f16:.2f} |" for x in r["rows"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gguf.md"))
    args = p.parse_args()
    tiny = ensure_tiny_model()
    from transformers import AutoModelForCausalLM

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny).parameters())
        results.append(measure("tiny", tiny, work, tiny_params))
        if not args.skip_large:
            large = work / "qwen2-0.5b-size"
            params = build_large(large, tiny)
            results.append(measure("qwen2-0.5b-size (random init)", large, work, params))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_markdown(results))
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print(to_markdown(results))


if __name__ == "__main__":
    main()
