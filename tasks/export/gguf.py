"""GGUF conversion (llama.cpp's converter) and quantization (llama-cpp-python).

The fetched model (LoRA already merged) is converted once to f16 (or bf16), then quantized
to every type in `outputs.gguf` through llama-cpp-python's quantize API, which gives the
same bytes as llama.cpp's `llama-quantize` binary (not shipped in the pip build).

Two checks happen before any work:
- k-quants need every weight row to be a multiple of 256. Rows that are not (hidden 896 in
  Qwen2.5-0.5B, say) fall back to another type the way llama.cpp does (q4_K -> q5_0,
  q6_K -> q8_0): the plan says how many weights will, and each file records how many
  tensors fell back and to what. `outputs.gguf_strict: true` refuses such types instead.
- llama.cpp recognises a BPE pre-tokenizer by a hash over the token ids of a fixed text,
  so a newly trained vocabulary is never in its table. When, and only when, the model's
  normalizer and pre-tokenizer are exactly those of a family llama.cpp knows (compared
  with what transformers builds for that family), the model's hash is registered under
  that family's name, as llama.cpp's own update script would do. Anything else is left to
  the converter, which rejects unknown tokenizers rather than mislabel them.
"""

from __future__ import annotations

import ast
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from hashlib import sha256
from pathlib import Path
from typing import Any

from tasks.core.atomic import write_text
from tasks.core.derived_cache import config_key, derived
from tasks.core.errors import UserFacingError
from tasks.core.manifest import sha256_file
from tasks.core.model_source import auto_model_class, in_tower, is_vision_model, load_config
from tasks.core.models import GgufFile, GgufFiles, JobResult, StageOutcome
from tasks.core.spec import Outputs
from tasks.export.gguf_converter import CHKTXT_PREFIX, ConverterUnavailable, find_converter
from tasks.export.gguf_summary import fallback_text

FTYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
BASE_TYPES = ("f16", "bf16")
# Block sizes: k-quants pack 256 values per block, the legacy and q8_0 types 32.
ROW_MULTIPLE = {q: (256 if "_k" in q else 32) for q in FTYPES}


# What llama.cpp logs when a tensor cannot take the requested type:
#   "warning: blk.0.ffn_up.weight - ncols 896 not divisible by 256 (required for type q4_K)
#    -> falling back to q5_0"  and, once, "144 of 290 tensor(s) required fallback quantization"
FALLBACK_MESSAGE = re.compile(r"falling back to|required fallback quantization", re.IGNORECASE)
FALLBACK_TENSOR = re.compile(r"required for type\s+(\S+)\)\s*->\s*falling back to\s+(\S+)")
FALLBACK_TOTAL = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback quantization")


def parse_fallbacks(log: str) -> tuple[int, int | None, dict[str, int]]:
    """(tensors that fell back, tensors in all, {"q4_K -> q5_0": count}) from a quantize log."""
    kinds: dict[str, int] = {}
    for wanted, got in FALLBACK_TENSOR.findall(log):
        kinds[f"{wanted} -> {got}"] = kinds.get(f"{wanted} -> {got}", 0) + 1
    total = FALLBACK_TOTAL.search(log)
    count = int(total.group(1)) if total else sum(kinds.values())
    return count, int(total.group(2)) if total else None, kinds


class GgufError(UserFacingError, RuntimeError):
    """Conversion or quantization cannot produce what was asked; the message says why."""


def weight_row_sizes(model_dir: Path) -> dict[str, int]:
    """Length of each 2-D weight's rows (its last dimension), read from safetensors headers; the
    language model's only (a multimodal model's towers go to its projector file)."""
    from safetensors import safe_open

    sizes = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for name in st.keys():
                shape = st.get_slice(name).get_shape()
                if len(shape) == 2 and not in_tower(name):  # a tower goes to the projector, kept f16
                    sizes[name] = int(shape[-1])
    return sizes


def config_row_sizes(config: Any) -> dict[str, int]:
    """Row lengths of every 2-D weight of an architecture, from its config on the meta device
    (so the check can run at planning time, before any weights exist), once per config."""

    def measure() -> dict[str, int]:
        import torch

        with torch.device("meta"):
            model = auto_model_class(config).from_config(config)
        return {n: int(p.shape[-1]) for n, p in model.named_parameters() if p.dim() == 2 and not in_tower(n)}

    return derived("row-sizes", {"config": config_key(config)}, measure)


def check_quant_types(rows: dict[str, int], types: list[str], strict: bool = False) -> list[str]:
    """What will fall back for each type, as plan notes; with `strict`, refuse such types."""
    notes = []
    for quant in types:
        if quant in BASE_TYPES:
            continue
        multiple = ROW_MULTIPLE[quant]
        bad = {n: r for n, r in rows.items() if r % multiple}
        if not bad:
            continue
        name, size = next(iter(bad.items()))
        if strict:
            works = [q for q in FTYPES if all(r % ROW_MULTIPLE[q] == 0 for r in rows.values())]
            raise GgufError(
                f"gguf type {quant} needs every weight row to be a multiple of {multiple}, but {len(bad)} "
                f"weight(s) are not (e.g. {name}: rows of {size}), and outputs.gguf_strict is on. Types this "
                f"model can take without fallback: {', '.join([*BASE_TYPES, *works])}; or set gguf_strict: false "
                "to let those rows fall back as llama.cpp does"
            )
        notes.append(
            f"gguf {quant}: {len(bad)} of {len(rows)} weights have rows that are not a multiple of {multiple} "
            f"(e.g. {name}: {size}); llama.cpp stores those in a fallback type (the report lists them per file)"
        )
    return notes


def converter_architectures(table: str = "TEXT_MODEL_MAP") -> set[str] | None:
    """The architectures llama.cpp's converter can convert (its TEXT_MODEL_MAP, or with
    MMPROJ_MODEL_MAP the projectors it writes; read from its source, never copied here); None
    when the converter is not installed."""
    try:
        converter = find_converter()
    except ConverterUnavailable:
        return None
    tree = ast.parse((converter / "conversion" / "__init__.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == table and node.value is not None:
            return set(ast.literal_eval(node.value))
    return None


def check_converter_knows(config: Any, types: list[str]) -> list[str]:
    """Refuse, at planning time, GGUF files of an architecture the converter cannot convert
    (before any money goes into training); a note when that cannot be checked here."""
    architectures = converted_architectures(config)
    if not types or not architectures:
        return []
    for (table, arch), what in zip(architectures.items(), ("the model", "its vision projector"), strict=False):
        known = converter_architectures(table)
        if known is None:
            return ["GGUF: llama.cpp's converter is not installed here, so the architecture could not be checked"]
        if arch not in known:
            raise GgufError(
                f"llama.cpp's converter (the one pinned with llama-cpp-python) cannot convert {what} ({arch}), so "
                "no GGUF file can be made for this model; set outputs.gguf: [] to train and publish without GGUF files"
            )
    return []


def converted_architectures(config: Any) -> dict[str, str]:
    """The architecture llama.cpp's converter looks up for the language model (a multimodal
    model's text_config names its own), and for a vision model's projector, by converter table."""
    names = list(getattr(config, "architectures", None) or [])
    if not names:
        return {}
    text = getattr(getattr(config, "text_config", None), "architectures", None) or names
    found = {"TEXT_MODEL_MAP": text[0]}
    if is_vision_model(config):
        found["MMPROJ_MODEL_MAP"] = names[0]
    return found


# --- the tokenizer's family ---------------------------------------------------------------


def _ids_only(node: Any) -> Any:
    """Drop options that change offsets but never token ids (`trim_offsets`)."""
    if isinstance(node, dict):
        return {k: _ids_only(v) for k, v in node.items() if k != "trim_offsets"}
    if isinstance(node, list):
        return [_ids_only(v) for v in node]
    return node


def known_families() -> dict[str, dict[str, Any]]:
    """Normalizer and pre-tokenizer of each family, as transformers itself builds them."""
    from transformers import Qwen2Tokenizer

    qwen2 = json.loads(Qwen2Tokenizer(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]).backend_tokenizer.to_str())
    return {"qwen2": {"normalizer": qwen2["normalizer"], "pre_tokenizer": qwen2["pre_tokenizer"]}}


def tokenizer_family(model_dir: Path) -> str | None:
    """The llama.cpp pre-tokenizer name whose pipeline this tokenizer has exactly, or None."""
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("model", {}).get("type") != "BPE":
        return None
    for family, ref in known_families().items():
        if _ids_only(data.get("normalizer")) == _ids_only(ref["normalizer"]) and _ids_only(
            data.get("pre_tokenizer")
        ) == _ids_only(ref["pre_tokenizer"]):
            return family
    return None


def converter_chktxt(converter: Path) -> str:
    """The fixed text the converter hashes, read from its source (never copied here)."""
    tree = ast.parse((converter / "conversion" / "base.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "get_vocab_base_pre":
            for sub in ast.walk(node):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and sub.value.startswith(CHKTXT_PREFIX):
                    return sub.value
    raise GgufError(f"could not find the pre-tokenizer check text in {converter}/conversion/base.py")


def tokenizer_chkhsh(model_dir: Path, chktxt: str) -> str:
    """The hash exactly as the converter computes it (same tokenizer class, same call)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return sha256(str(tok.encode(chktxt)).encode()).hexdigest()


def hash_registrations(model_dir: Path, converter: Path) -> dict[str, str]:
    """{chkhsh: family} for a tokenizer whose pipeline is exactly a known family's."""
    family = tokenizer_family(model_dir)
    if family is None:
        return {}
    return {tokenizer_chkhsh(model_dir, converter_chktxt(converter)): family}


# --- conversion and quantization ----------------------------------------------------------


def convert_to_gguf(model_dir: Path, outfile: Path, outtype: str, log_path: Path, *extra: str) -> float:
    """Run the converter through our driver (`extra`: its further options, e.g. --mmproj);
    returns the seconds it took."""
    converter = find_converter()
    registrations = hash_registrations(model_dir, converter)
    partial = outfile.with_name(f"{outfile.name}.{os.getpid()}.partial")  # one writer each, a killed flow too
    cmd = [
        sys.executable,
        "-m",
        "tasks.export.gguf_converter",
        "--run",
        str(converter),
        *(f"{h}={name}" for h, name in registrations.items()),
        "--",
        str(model_dir),
        "--outtype",
        outtype,
        "--outfile",
        str(partial),
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "NO_LOCAL_GGUF": ""}
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not partial.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        partial.unlink(missing_ok=True)
        raise GgufError(f"llama.cpp's converter failed on {model_dir} (log: {log_path}):\n{tail}")
    partial.replace(outfile)
    return seconds


def quantize(base: Path, outfile: Path, quant: str, strict: bool = False) -> tuple[float, tuple]:
    """Quantize with llama-cpp-python; returns the seconds and `parse_fallbacks` of its log.
    With `strict`, a fallback fails instead."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[quant])
    params.nthread = max(1, len(os.sched_getaffinity(0)))
    partial = outfile.with_name(f"{outfile.name}.{os.getpid()}.partial")  # one writer each, a killed flow too
    # llama.cpp reports fallbacks only in its log: route its log callback (which llama-cpp-python
    # otherwise prints, and Prefect turns into log lines) and its raw stderr into our hands.
    import llama_cpp._logger as llama_logger

    collected: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        collected.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    with tempfile.TemporaryFile(mode="w+b") as captured:
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(captured.fileno(), 2)
        try:
            start = time.perf_counter()
            rc = llama_cpp.llama_model_quantize(str(base).encode(), str(partial).encode(), ctypes.byref(params))
            seconds = time.perf_counter() - start
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            llama_cpp.llama_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
        captured.seek(0)
        messages = "".join(collected) + captured.read().decode(errors="replace")
    outfile.with_suffix(".quantize.log").write_text(messages)
    if rc != 0 or not partial.exists():
        partial.unlink(missing_ok=True)
        raise GgufError(f"quantizing to {quant} failed (code {rc}): {messages[-800:]}")
    lines = [line.strip() for line in messages.splitlines() if FALLBACK_MESSAGE.search(line)]
    if lines and strict:
        partial.unlink(missing_ok=True)
        raise GgufError(f"quantizing to {quant} fell back to another type (outputs.gguf_strict is on): {lines[:3]}")
    partial.replace(outfile)
    return seconds, parse_fallbacks(messages)


def _remove_orphaned_partials(out_dir: Path) -> None:
    """Half-written files of a flow that was killed (their writer's pid is gone)."""
    for partial in out_dir.glob("*.partial"):
        pid = partial.name.split(".")[-2]
        if pid.isdigit() and not _alive(int(pid)):
            partial.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def convert_gguf(result: JobResult, outputs: Outputs, run_dir: Path, run_name: str) -> GgufFiles:
    """Convert, then quantize to every requested type; the files are smoke-tested next."""
    from tasks.export.modelfile import modelfile

    if not outputs.gguf:
        return GgufFiles(outcome=StageOutcome(stage="convert_gguf", status="skipped", detail="outputs.gguf is empty"))
    model_dir = Path(result.model_dir)
    types = list(dict.fromkeys(outputs.gguf))
    check_quant_types(weight_row_sizes(model_dir), types, strict=outputs.gguf_strict)
    out_dir = run_dir / "gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_orphaned_partials(out_dir)
    base_type = "bf16" if "bf16" in types and "f16" not in types else "f16"
    base = out_dir / f"{run_name}-{base_type}.gguf"
    convert_s = convert_to_gguf(model_dir, base, base_type, out_dir / "convert.log")
    files, timings = [], [f"convert to {base_type}: {convert_s:.1f} s"]
    for quant in types:
        path = base if quant == base_type else out_dir / f"{run_name}-{quant}.gguf"
        fallback: tuple = (0, None, {})
        if quant != base_type:
            if quant in BASE_TYPES:
                timings.append(f"{quant}: {convert_to_gguf(model_dir, path, quant, out_dir / 'convert.log'):.1f} s")
            else:
                seconds, fallback = quantize(base, path, quant, strict=outputs.gguf_strict)
                timings.append(f"{quant}: {seconds:.2f} s")
        count, total, kinds = fallback
        files.append(
            GgufFile(
                quant=quant,
                path=str(path),
                size_mb=round(path.stat().st_size / 1e6, 3),
                sha256=sha256_file(path),  # checked by every later stage before it trusts the file
                fallback_tensors=count,
                total_tensors=total,
                fallbacks=kinds,
            )
        )
    if base_type not in types:
        base.unlink()
    mmproj = projector(model_dir, out_dir, run_name, timings)
    preferred = next((f for f in files if f.quant == "q4_k_m"), files[0])
    mf = out_dir / "Modelfile"
    write_text(mf, modelfile(Path(preferred.path).name, model_dir, Path(mmproj.path).name if mmproj else None))
    detail = f"{len(files)} file(s): " + ", ".join(
        f"{f.quant} {f.size_mb:.1f} MB" + (f" ({fallback_text(f)})" if f.fallback_tensors else "") for f in files
    )
    return GgufFiles(
        outcome=StageOutcome(stage="convert_gguf", status="passed", detail=f"{detail} ({'; '.join(timings)})"),
        files=files,
        modelfile=str(mf),
        convert_s=round(convert_s, 2),
        mmproj=mmproj,
    )


def projector(model_dir: Path, out_dir: Path, run_name: str, timings: list[str]) -> GgufFile | None:
    """A vision-language model's multimodal projector (vision tower and merger), as llama.cpp's
    converter writes it with --mmproj; kept in f16, as llama.cpp publishes projectors, whatever
    the language model's types. None for a text model."""
    if not is_vision_model(load_config(str(model_dir))):
        return None
    path = out_dir / f"{run_name}-mmproj-f16.gguf"  # "mmproj" in the name: the converter adds no prefix
    seconds = convert_to_gguf(model_dir, path, "f16", out_dir / "convert-mmproj.log", "--mmproj")
    timings.append(f"projector (mmproj) f16: {seconds:.1f} s")
    return GgufFile(
        quant="mmproj-f16", path=str(path), size_mb=round(path.stat().st_size / 1e6, 3), sha256=sha256_file(path)
    )
