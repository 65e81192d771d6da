"""Smoke test of one GGUF file against the transformers model it came from.

A file passes when llama.cpp tokenizes every sample exactly as the Hugging Face tokenizer
does, its next-token predictions agree with the transformers model at least as often as
its quantization type should allow, and it generates through its embedded chat template.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tasks.core.atomic import write_text
from tasks.core.manifest import sha256_file
from tasks.core.models import GgufFile
from tasks.export.gguf_vision import ImageQuestion, ask, chat_handler, flattened, image_questions

# Minimum top-1 agreement with the transformers model, by quantization type. Lossless types
# must agree almost everywhere; lower-bit types lose some argmax ties on tiny models.
MIN_AGREEMENT = {
    "f16": 0.98,
    "bf16": 0.98,
    "q8_0": 0.95,
    "q6_k": 0.9,
    "q5_k_m": 0.85,
    "q5_k_s": 0.85,
    "q4_k_m": 0.8,
    "q4_k_s": 0.8,
    "q4_0": 0.75,
    "q3_k_m": 0.6,
    "q2_k": 0.4,
}
# A quantized file may be this much more perplexed than the transformers model.
MAX_PERPLEXITY_RATIO = {"f16": 1.02, "bf16": 1.05, "q8_0": 1.05}
DEFAULT_MAX_PERPLEXITY_RATIO = 1.5
N_CTX = 512  # llama.cpp's context for the smoke test; longer held-out rows are cut to it


def _disable_extra_buffer_types() -> None:
    """Load models without llama.cpp's extra CPU buffer types (AMX, repacked weights).

    On CPUs with AMX, llama-cpp-python 0.3.36 built with -march=native crashes (SIGSEGV in
    ggml_backend_amx_mul_mat, at ldtilecfg) on any quantized model as soon as it evaluates two
    or more tokens. `Llama()` has no argument for it, so the default model parameters are
    wrapped; results are identical, only those CPU-specific fast paths are skipped.
    """
    import llama_cpp.llama_cpp as ll

    if getattr(ll.llama_model_default_params, "_finetune_flow", False):
        return
    default = ll.llama_model_default_params

    def params():  # noqa: ANN202 (a ctypes struct)
        p = default()
        p.use_extra_bufts = False
        return p

    params._finetune_flow = True  # type: ignore[attr-defined]
    ll.llama_model_default_params = params


def _log_softmax_nll(logits: Any, targets: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of `targets` under row-wise `logits` (numpy)."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    m = logits.max(axis=1, keepdims=True)
    logz = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
    picked = logits[np.arange(len(targets)), targets]
    return float((logz - picked).sum()), len(targets)


def smoke_test(
    path: Path,
    quant: str,
    reference: SmokeReference,
    threads: int | None = None,
    thresholds: dict[str, float] | None = None,
    mmproj: Path | None = None,
) -> GgufFile:
    """Load the file with llama-cpp-python and measure it against the transformers model's
    `reference`; never raises for a bad file. `thresholds` ({"min_agreement": ..,
    "max_perplexity_ratio": ..}) decide whether it passes. With a vision model's projector
    (`mmproj`), the reference's image questions are asked too."""
    threads = threads or int(os.environ.get("OMP_NUM_THREADS") or 2)  # the share a caller gave this process
    size_mb = path.stat().st_size / 1e6
    start = time.perf_counter()
    try:
        llm = _load(path, threads, mmproj)
    except Exception as e:  # a file llama.cpp cannot load fails the test, with the reason
        return GgufFile(
            quant=quant,
            path=str(path),
            size_mb=round(size_mb, 3),
            sha256=sha256_file(path),
            passed=False,
            problems=[f"llama.cpp could not load it: {e}"],
        )
    load_s = time.perf_counter() - start
    matches, problems = tokenization_matches(llm, reference)
    agreement, ppl, hf_ppl = agreement_and_perplexity(llm, reference)
    generated, n_gen, gen_s = chat_answer(llm, reference.chat_prompt)
    seen = image_answers(llm, reference, problems) if mmproj else {}
    del llm
    limits = thresholds or default_thresholds(quant)
    checked = len(reference.texts)
    problems += shortfalls(quant, limits, checked - matches, checked, agreement, ppl, hf_ppl, n_gen)
    return GgufFile(
        quant=quant,
        path=str(path),
        size_mb=round(size_mb, 3),
        sha256=sha256_file(path),
        load_s=round(load_s, 3),
        tokenization_matches=matches,
        tokenization_checked=checked,
        top1_agreement=round(agreement, 4) if agreement is not None else None,
        perplexity=round(ppl, 4) if ppl is not None else None,
        hf_perplexity=round(hf_ppl, 4) if hf_ppl is not None else None,
        generation_tokens_per_s=round(n_gen / gen_s, 1) if gen_s > 0 and n_gen else None,
        sample_generation=generated[:200],
        passed=not problems,
        problems=problems,
        thresholds=limits,
        **seen,
    )


def _load(path: Path, threads: int, mmproj: Path | None) -> Any:
    """The file in llama.cpp, every position's logits kept; with the projector's chat handler."""
    from llama_cpp import Llama

    _disable_extra_buffer_types()
    handler = chat_handler(mmproj) if mmproj else None
    return Llama(
        model_path=str(path),
        n_ctx=N_CTX,
        logits_all=True,
        verbose=False,
        n_threads=threads,
        seed=0,
        chat_handler=handler,
    )


def image_answers(llm: Any, reference: SmokeReference, problems: list[str]) -> dict[str, Any]:
    """The image questions asked with the projector: the first one's answer, and the mean agreement."""
    if not reference.image_questions:
        return {}
    try:
        asked = [ask(llm, q) for q in reference.image_questions]
    except Exception as e:  # libmtmd's errors come as many types; the message says what failed
        problems.append(f"llama.cpp could not answer an image question with the projector: {e}")
        return {}
    first = reference.image_questions[0]
    return {
        "image_question": first.question,
        "image": first.image,
        "image_answer": asked[0][0][:200],
        "hf_image_answer": first.hf_answer[:200],
        "image_prompt_tokens": asked[0][1],
        "image_answer_agreement": round(sum(a for _, _, a in asked) / len(asked), 4),
    }


def tokenization_matches(llm: Any, reference: SmokeReference) -> tuple[int, list[str]]:
    """How many texts llama.cpp tokenizes exactly as the model's tokenizer, and the first differences."""
    matches, problems = 0, []
    for text, theirs in zip(reference.texts, reference.text_ids, strict=True):
        ours = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if ours == theirs:
            matches += 1
        elif len(problems) < 3:
            problems.append(f"tokenization differs for {text[:40]!r}: llama.cpp {ours[:12]} vs HF {theirs[:12]}")
    return matches, problems


def agreement_and_perplexity(llm: Any, reference: SmokeReference) -> tuple[float | None, float | None, float | None]:
    """Top-1 agreement with the transformers model, and both perplexities, on the held-out texts."""
    import numpy as np

    if not reference.positions:
        return None, None, None
    agree, nll_gguf = 0, 0.0
    for ids, theirs in zip(reference.heldout_ids, reference.hf_argmax, strict=True):
        llm.reset()
        llm.eval(ids)
        ours = np.asarray(llm.scores[: len(ids)])
        agree += int((ours[:-1].argmax(-1) == np.asarray(theirs)).sum())
        nll_gguf += _log_softmax_nll(ours[:-1], ids[1:])[0]
    positions = reference.positions
    return agree / positions, math.exp(nll_gguf / positions), math.exp(reference.hf_nll / positions)


def chat_answer(llm: Any, chat_prompt: list[dict[str, str]]) -> tuple[str, int, float]:
    """An answer through the model's chat template: its text, tokens and seconds."""
    llm.reset()
    start = time.perf_counter()
    out = llm.create_chat_completion(messages=chat_prompt, max_tokens=24, temperature=0.0, seed=0)
    gen_s = time.perf_counter() - start
    return out["choices"][0]["message"]["content"] or "", out.get("usage", {}).get("completion_tokens", 0), gen_s


def shortfalls(
    quant: str,
    limits: dict[str, float],
    mismatched: int,
    checked: int,
    agreement: float | None,
    ppl: float | None,
    hf_ppl: float | None,
    n_gen: int,
) -> list[str]:
    """Why the file fails its thresholds (none when it passes)."""
    problems = []
    if mismatched:
        problems.append(f"{mismatched} of {checked} sample texts tokenize differently")
    need = limits["min_agreement"]
    if agreement is not None and agreement < need:
        problems.append(f"top-1 agreement {agreement:.1%} is below {need:.0%} for {quant}")
    ratio_cap = limits["max_perplexity_ratio"]
    if ppl is not None and hf_ppl is not None and ppl > hf_ppl * ratio_cap:
        problems.append(f"perplexity {ppl:.3f} is over {ratio_cap}x the transformers model's {hf_ppl:.3f}")
    if n_gen == 0:
        problems.append("generation through the chat template produced no tokens")
    return problems


def default_thresholds(quant: str) -> dict[str, float]:
    return {
        "min_agreement": MIN_AGREEMENT.get(quant, 0.5),
        "max_perplexity_ratio": MAX_PERPLEXITY_RATIO.get(quant, DEFAULT_MAX_PERPLEXITY_RATIO),
    }


def thresholds_for(quant: str, outputs: Any = None) -> dict[str, float]:
    """The defaults above, overridden per type by the spec's outputs.gguf_min_agreement and
    outputs.gguf_max_perplexity_ratio."""
    limits = default_thresholds(quant)
    if outputs is not None:
        if quant in outputs.gguf_min_agreement:
            limits["min_agreement"] = float(outputs.gguf_min_agreement[quant])
        if quant in outputs.gguf_max_perplexity_ratio:
            limits["max_perplexity_ratio"] = float(outputs.gguf_max_perplexity_ratio[quant])
    return limits


def _render_rows(tokenizer: Any, rows: list[dict]) -> list[str]:
    """Each row as the text the model was trained on (preference rows: prompt + chosen)."""
    rendered = []
    for row in rows:
        if "messages" in row:
            turns: Any = row["messages"]
        elif "chosen" in row:
            prompt = row.get("prompt", [] if isinstance(row["chosen"], list) else "")
            turns = prompt + row["chosen"]
        elif "completion" in row:
            turns = row["prompt"] + row["completion"]
        elif "prompt" in row:  # prompt-only (GRPO) rows
            turns = row["prompt"]
        else:
            turns = row.get("text", "")
        rendered.append(tokenizer.apply_chat_template(turns, tokenize=False) if isinstance(turns, list) else turns)
    return rendered


def _sample_texts(tokenizer: Any, rows: list[dict]) -> list[str]:
    """Texts whose tokenization must match: rendered rows plus hard cases for tokenizers."""
    fixed = [
        "What is 7 + 12?",
        "Hello, world! How are you doing today?",
        "  leading spaces, trailing spaces  ",
        "tabs\tand\nnewlines\n\n\nmany",
        "numbers 1234567890 and 3.14159, -42",
        "punctuation: (a) [b] {c} <d> 'e' \"f\" ...!?",
        "unicode: café naïve Zürich straße",
        "emoji 🙂🚀 and symbols © ® ™ €",
        "I'm sure they'll say we've done it, isn't it?",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    ]
    return fixed + _render_rows(tokenizer, rows)


def _chat_prompt(rows: list[dict]) -> list[dict[str, str]]:
    for row in rows:
        if "messages" in row:
            return [m for m in row["messages"] if m["role"] != "assistant"][:2] or row["messages"][:1]
        if isinstance(row.get("prompt"), list):
            return row["prompt"]
        if isinstance(row.get("prompt"), str):
            return [{"role": "user", "content": row["prompt"]}]
    return [{"role": "user", "content": "Hello! Who are you?"}]


class SmokeReference(BaseModel):
    """What the transformers model says about the sample texts, computed once in the caller's
    process (which has torch loaded already), so the child that runs llama.cpp imports neither
    torch nor transformers: its start-up was 6 of its 7 seconds. Only argmaxes and summed
    log-likelihoods travel, never logits (a 150k vocabulary would make those gigabytes)."""

    model_config = ConfigDict(frozen=True)

    texts: list[str]  # tokenized by both, and compared
    text_ids: list[list[int]]
    heldout_ids: list[list[int]]  # rendered rows, at most N_CTX tokens, two or more each
    hf_argmax: list[list[int]]  # the transformers model's top-1 at each position but the last
    hf_nll: float  # its summed negative log-likelihood of each next token
    chat_prompt: list[dict[str, str]]
    image_questions: list[ImageQuestion] = []  # a vision-language model's, asked with the projector

    @property
    def positions(self) -> int:
        """The next-token predictions compared: every held-out token but each row's first."""
        return sum(len(ids) - 1 for ids in self.heldout_ids)


def reference_for(
    model_dir: Path, rows: list[dict], images: Path | None = None, resized: Path | None = None
) -> SmokeReference:
    """`images`: where a vision-language model's rows keep their images (its questions are asked
    with them, resized as its processor resizes them into `resized`; its language model is
    compared on the rows' text alone)."""
    import torch
    from transformers import AutoTokenizer

    from tasks.core.model_source import auto_model_class, load_config, load_processor

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = auto_model_class(load_config(str(model_dir))).from_pretrained(model_dir, dtype="float32").eval()
    processor = load_processor(str(model_dir)) if images else None
    asked = image_questions(model, processor, rows, images, resized or images) if images else []
    rows = flattened(rows) if images else rows
    texts = _sample_texts(tokenizer, rows)
    heldout, argmaxes, nll = [], [], 0.0
    for text in _render_rows(tokenizer, rows):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:N_CTX]
        if len(ids) < 2:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].float().numpy()
        heldout.append(ids)
        argmaxes.append(logits.argmax(-1).tolist())
        nll += _log_softmax_nll(logits, ids[1:])[0]
    del model
    return SmokeReference(
        texts=texts,
        text_ids=[tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts],
        heldout_ids=heldout,
        hf_argmax=argmaxes,
        hf_nll=nll,
        chat_prompt=_chat_prompt(rows),
        image_questions=asked,
    )


def smoke_test_all(gguf: Any, model_dir: Path, heldout_path: Path, train_path: Path, outputs: Any = None) -> Any:
    """Smoke-test every file of a GgufFiles against the spec's thresholds; returns a new
    GgufFiles with the measurements (and each file's fallback record kept)."""
    from tasks.core.models import GgufFiles, StageOutcome

    rows = [json.loads(line) for line in heldout_path.read_text().splitlines() if line.strip()]
    if not rows:  # tiny datasets keep no held-out rows: fall back to a few training rows
        rows = [json.loads(line) for line in train_path.read_text().splitlines()[:8] if line.strip()]
    reference = Path(gguf.files[0].path).parent / "smoke_reference.json"
    images = heldout_path.parent if gguf.mmproj else None
    reference.write_text(reference_for(model_dir, rows[:16], images, reference.parent).model_dump_json())
    mmproj = Path(gguf.mmproj.path) if gguf.mmproj else None
    checks = [SmokeCheck(Path(f.path), f.quant, thresholds_for(f.quant, outputs), mmproj) for f in gguf.files]
    measured = smoke_test_in_children(checks, reference)
    tested = [
        result.model_copy(
            update={"fallback_tensors": f.fallback_tensors, "total_tensors": f.total_tensors, "fallbacks": f.fallbacks}
        )
        for f, result in zip(gguf.files, measured, strict=True)
    ]
    failed = [f for f in tested if not f.passed]
    if failed:
        detail = "; ".join(f"{f.quant}: {', '.join(f.problems)}" for f in failed)
        status = "failed"
    else:
        detail = ", ".join(
            f"{f.quant}: agreement {f.top1_agreement:.0%}, ppl {f.perplexity:.2f} vs {f.hf_perplexity:.2f}"
            if f.top1_agreement is not None and f.perplexity and f.hf_perplexity
            else f.quant
            for f in tested
        )
        status = "passed"
    projector = projector_tested(gguf.mmproj, tested)
    if projector is not None:
        detail += "; on the rows' text alone" if status == "passed" else ""
        detail += (
            f"; with the projector, asked {projector.image_question!r}: {projector.image_answer!r} "
            f"(transformers: {projector.hf_image_answer!r})"
            if projector.passed
            else f"; projector: {'; '.join(projector.problems)}"
        )
    return GgufFiles(
        outcome=StageOutcome(stage="smoke_test_gguf", status=status, detail=detail),
        files=tested,
        modelfile=gguf.modelfile,
        convert_s=gguf.convert_s,
        mmproj=projector,
    )


def projector_tested(mmproj: GgufFile | None, tested: list[GgufFile]) -> GgufFile | None:
    """The projector passes with the first model file that answered an image question through it."""
    if mmproj is None:
        return None
    answered = next((f for f in tested if f.image_answer is not None), None)
    if answered is None:
        return mmproj.model_copy(update={"passed": False, "problems": ["no model file answered an image question"]})
    fields = ("image_question", "image", "image_answer", "hf_image_answer", "image_answer_agreement")
    fields += ("image_prompt_tokens",)
    return mmproj.model_copy(update={"passed": True, **{k: getattr(answered, k) for k in fields}})


@dataclass(frozen=True)
class SmokeCheck:
    """One file to test, and the thresholds it must meet."""

    path: Path
    quant: str
    thresholds: dict[str, float]
    mmproj: Path | None = None  # a vision model's projector, loaded with the file

    @property
    def result_file(self) -> Path:
        return self.path.with_suffix(".smoke.json")


CHILD_TIMEOUT_S_PER_FILE = 600  # what one process per file had, before the files shared one
Runner = Callable[[list[str], dict[str, str], float], "subprocess.CompletedProcess[str]"]


def _run(cmd: list[str], env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=timeout_s)


def smoke_test_in_children(checks: list[SmokeCheck], reference: Path, run: Runner = _run) -> list[GgufFile]:
    """The files are tested in order in one child process, which loads llama.cpp once (the
    demo's four files: 0.7 s instead of 20 s with a process each that loaded torch too). A crash inside
    llama.cpp fails only the file it was testing, with the signal named, instead of taking
    the flow down: that file is tried once more, and the files after it go on in a new child.
    An ordinary error (not a signal) would only repeat, so it fails the files left at once."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "TOKENIZERS_PARALLELISM": "false"}
    results: dict[Path, GgufFile] = {}
    pending, crashed_once = list(checks), set()
    while pending:
        for check in pending:
            check.result_file.unlink(missing_ok=True)
        proc = run(_child_command(pending, reference), env, CHILD_TIMEOUT_S_PER_FILE * len(pending))
        for check in [c for c in pending if c.result_file.exists()]:
            results[check.path] = GgufFile.model_validate_json(check.result_file.read_text())
        pending = [c for c in pending if c.path not in results]
        if not pending:
            break
        if proc.returncode >= 0:
            results.update({c.path: _died(c, proc) for c in pending})
            break
        if pending[0].path in crashed_once:
            results[pending[0].path] = _died(pending[0], proc)
            pending = pending[1:]
        else:
            crashed_once.add(pending[0].path)
    return [results[c.path] for c in checks]


def _child_command(checks: list[SmokeCheck], reference: Path) -> list[str]:
    files = [
        {"path": str(c.path), "quant": c.quant, "thresholds": c.thresholds, "mmproj": str(c.mmproj or "")}
        for c in checks
    ]
    return [sys.executable, "-m", "tasks.export.gguf_smoke", str(reference), json.dumps(files)]


def _died(check: SmokeCheck, proc: subprocess.CompletedProcess[str]) -> GgufFile:
    how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    return GgufFile(
        quant=check.quant,
        path=str(check.path),
        size_mb=round(check.path.stat().st_size / 1e6, 3),
        sha256=sha256_file(check.path),
        passed=False,
        problems=[f"the smoke test process died ({how}): {(proc.stderr or '').strip()[-300:]}"],
    )


def _main(argv: list[str]) -> None:
    """The child: every file in order, each result written as soon as it is measured."""
    reference_file, files = argv
    reference = SmokeReference.model_validate_json(Path(reference_file).read_text())
    for file in json.loads(files):
        mmproj = Path(file["mmproj"]) if file["mmproj"] else None
        check = SmokeCheck(Path(file["path"]), file["quant"], file["thresholds"], mmproj)
        result = smoke_test(check.path, check.quant, reference, thresholds=check.thresholds, mmproj=mmproj)
        write_text(check.result_file, result.model_dump_json(indent=2))  # whole, or not there


if __name__ == "__main__":
    _main(sys.argv[1:])
