"""The model card (README.md with YAML metadata), the loss curve PNG and the Ollama Modelfile.

Everything here is rendered from the run's typed objects; no token or local secret can
reach it because none is ever passed in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tasks.core.methods import method_definition
from tasks.core.models import EvaluationResult, GgufFiles, JobResult, JobStatus, RunPlan
from tasks.core.money import usd
from tasks.core.spec import RunSpec
from tasks.data.reading import HUB_ID
from tasks.evaluate.summary import evaluation_lines
from tasks.export.gguf_summary import fallback_text, gguf_cells


def loss_curve_png(status: JobStatus, path: Path, title: str) -> Path | None:
    """Plot the training loss; None when there is nothing to plot."""
    if not status.losses:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([p.step for p in status.losses], [p.loss for p in status.losses], marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    # Agg writes no creation time into the PNG, so an unchanged run gives identical bytes.
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return path


def example_image(gguf: GgufFiles | None) -> str | None:
    """The name in the release of the held-out image a vision model's card shows, asked about."""
    if gguf is None or gguf.mmproj is None or not gguf.mmproj.passed or not gguf.mmproj.image:
        return None
    return "example" + Path(gguf.mmproj.image).suffix


def card_metadata(spec: RunSpec, plan: RunPlan, gguf: GgufFiles | None, license_id: str) -> dict[str, Any]:
    classifier = method_definition(spec.method).head == "sequence_classification"
    vision = bool(plan.script.config.get("vision"))
    kind = "reward-model" if classifier else "image-text-to-text" if vision else "text-generation"
    tags = ["finetune-flow", spec.method, "trl", kind, *(["vision"] if vision else [])]
    if plan.hardware.use_lora:
        tags += ["peft", "lora"]
    if gguf is not None and any(f.passed for f in gguf.files):
        tags.append("gguf")
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-classification" if classifier else kind,
        "license": license_id,
        "tags": tags,
    }
    # a recipe's later stage starts from a local folder; the Hub model the chain began from is the base
    root = spec.evaluation.baseline if spec.evaluation.baseline and Path(spec.model).exists() else spec.model
    if HUB_ID.match(root) and not Path(root).exists():
        meta["base_model"] = root
    if HUB_ID.match(spec.dataset) and not Path(spec.dataset).exists():
        meta["datasets"] = [spec.dataset]
    return meta


BUILT_IN = {"tiny": "embedded tiny Qwen2 (random init)", "tiny-vl": "embedded tiny Qwen2.5-VL (random init)"}


def _settings_rows(spec: RunSpec, plan: RunPlan, status: JobStatus) -> list[tuple[str, str]]:
    t = plan.script.config["training"]
    rows = [
        ("method", f"{spec.method.upper()} ({plan.script.trainer})"),
        ("base model", BUILT_IN.get(spec.model, spec.model)),
        (
            "dataset",
            f"{Path(spec.dataset).name if Path(spec.dataset).exists() else spec.dataset} "
            f"({plan.dataset.rows} rows, {plan.dataset.format})",
        ),
        ("epochs / max steps", f"{t.get('num_train_epochs')} / {t.get('max_steps', -1)}"),
        ("learning rate", str(t.get("learning_rate"))),
        (
            "batch size x accumulation",
            f"{t.get('per_device_train_batch_size')} x {t.get('gradient_accumulation_steps')}",
        ),
        ("max length", str(t.get("max_length"))),
        ("precision", plan.hardware.dtype),
        (
            "LoRA",
            (
                f"r={spec.lora.r}, alpha={spec.lora.alpha}, dropout={spec.lora.dropout}, "
                f"targets={plan.hardware.lora_target_modules}"
            )
            if plan.hardware.use_lora
            else "no (full fine-tuning)",
        ),
        ("steps", str(status.steps)),
        ("training time", f"{status.duration_s:.0f} s"),
        ("hardware", plan.hardware.description),
    ]
    return rows


def _gguf_table(gguf: GgufFiles) -> list[str]:
    lines = [
        "| file | type | size | fallback tensors | perplexity (HF model) | top-1 agreement | tokenization "
        "| generation tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in gguf.files:
        ppl, agree, tps = gguf_cells(f)
        lines.append(
            f"| `{Path(f.path).name}` | {f.quant} | {f.size_mb:.1f} MB | {fallback_text(f)} | {ppl} | {agree} | "
            f"{f.tokenization_matches}/{f.tokenization_checked} identical | {tps} |"
        )
    return lines


def model_card(
    spec: RunSpec,
    plan: RunPlan,
    status: JobStatus,
    result: JobResult,
    gguf: GgufFiles | None,
    repo_id: str,
    loss_png: str | None,
    cost_usd: float,
    license_id: str = "apache-2.0",
    evaluation: EvaluationResult | None = None,
) -> str:
    """The README.md of a release: metadata, how it was trained, what it measured, how to run it."""
    meta = card_metadata(spec, plan, gguf, license_id)
    name = repo_id.rstrip("/").split("/")[-1]
    files = gguf.files if gguf is not None else []
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    lines.append(
        f"Fine-tuned with {spec.method.upper()} by finetune-flow from "
        f"`{spec.model}` on `{Path(spec.dataset).name if Path(spec.dataset).exists() else spec.dataset}`"
        + (f", in a recipe that began from `{spec.evaluation.baseline}`." if spec.evaluation.baseline else ".")
    )
    lines += ["", "## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _settings_rows(spec, plan, status)]
    lines += result_lines(spec, status, result, loss_png, evaluation)
    lines += [
        "",
        "## Cost",
        "",
        f"{usd(cost_usd)} (estimated before the run: {usd(plan.cost.usd)}, "
        f"range {usd(plan.cost.usd_low)}-{usd(plan.cost.usd_high)}).",
        "",
    ]
    if gguf is not None and files:
        lines += ["## GGUF files", "", *_gguf_table(gguf), ""]
        lines += [
            "Perplexity and top-1 agreement are measured on held-out rows of the training data against the "
            "transformers model; tokenization is compared with the Hugging Face tokenizer.",
            "",
            *projector_lines(gguf),
        ]
    if method_definition(spec.method).head == "sequence_classification":
        return "\n".join(lines + how_to_score(repo_id, method_definition(spec.method).no_gguf))
    names = [Path(f.path).name for f in files if f.passed]
    if plan.script.config.get("vision"):
        return "\n".join(lines + how_to_run_vision(repo_id, name, names, gguf))
    return "\n".join(lines + how_to_run(repo_id, name, [Path(f.path).name for f in files]))


def result_lines(
    spec: RunSpec, status: JobStatus, result: JobResult, loss_png: str | None, evaluation: EvaluationResult | None
) -> list[str]:
    """The loss, the trainer's metrics, the curve, and the before/after verdict."""
    lines = ["", "## Results", ""]
    if status.losses:
        lines.append(
            f"Training loss {status.losses[0].loss:.4f} (step {status.losses[0].step}) -> "
            f"{status.losses[-1].loss:.4f} (step {status.losses[-1].step})."
        )
    for key in ("train_loss", "train_runtime", "train_samples_per_second"):
        if key in result.train_metrics:
            lines.append(f"- {key}: {result.train_metrics[key]:.4g}")
    if loss_png:
        lines += ["", f"![training loss]({loss_png})"]
    if evaluation is not None:
        lines += ["", "## Evaluation against the model it started from", "", *evaluation_lines(evaluation)]
        lines += ["", method_definition(spec.method).check_by_hand]
    return lines


def how_to_score(repo_id: str, no_gguf: str) -> list[str]:
    """A reward model: load it, score an answer, and hand it to a TRL trainer as the reward."""
    return [
        "## How to use it",
        "",
        "A reward model: one score per conversation, higher for a better answer. With transformers:",
        "",
        "```python",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        f'tok = AutoTokenizer.from_pretrained("{repo_id}")',
        f'model = AutoModelForSequenceClassification.from_pretrained("{repo_id}")',
        'chat = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "3 + 4 = 7"}]',
        "ids = tok.apply_chat_template(chat, tokenize=False)",
        'print(model(**tok(ids, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item())',
        "```",
        "",
        "As the reward of TRL's GRPO or RLOO trainer, which loads a sequence classifier given its name or folder "
        f'and scores each prompt and completion with its own tokenizer: `GRPOTrainer(..., reward_funcs="{repo_id}")`.',
        "",
        f"No GGUF files: {no_gguf}.",
        "",
    ]


def how_to_run(repo_id: str, name: str, gguf_names: list[str]) -> list[str]:
    """With transformers, and with llama.cpp, Ollama and LM Studio when there are GGUF files."""
    lines = [
        "## How to run it",
        "",
        "With transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tok = AutoTokenizer.from_pretrained("{repo_id}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        'messages = [{"role": "user", "content": "What is 3 + 4?"}]',
        'ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")',
        "print(tok.decode(model.generate(ids, max_new_tokens=32)[0]))",
        "```",
        "",
    ]
    if not gguf_names:
        return lines
    return lines + [
        "With llama.cpp (`llama-cli` uses the chat template stored in the file):",
        "",
        "```bash",
        *(f"llama-cli -m gguf/{file} -cnv" for file in gguf_names),
        "```",
        "",
        *ollama_lines(name, "the `Modelfile` next to the GGUF files sets the template and stop tokens"),
        "With LM Studio: copy a file into LM Studio's models folder, or",
        "",
        "```bash",
        f"lms import gguf/{gguf_names[0]}",
        "```",
        "",
    ]


def projector_lines(gguf: GgufFiles) -> list[str]:
    """A vision model's projector, and the held-out image question it answered (with the image)."""
    p = gguf.mmproj
    if p is None:
        return []
    lines = [
        f"`{Path(p.path).name}` ({p.size_mb:.1f} MB, f16) is the vision tower and its projector (llama.cpp's "
        "`--mmproj`): load it beside any file above. The language model's numbers above are measured on the rows' "
        "text without their images.",
        "",
    ]
    example = example_image(gguf)
    if example is None:
        return lines + [f"It was not used: {'; '.join(p.problems) or 'no image question was asked'}.", ""]
    agreement = f"{p.image_answer_agreement:.0%}" if p.image_answer_agreement is not None else "n/a"
    return lines + [
        f"![a held-out image]({example})",
        "",
        f"Asked of llama.cpp with the projector: *{p.image_question}* -> `{p.image_answer}` (the transformers "
        f"model: `{p.hf_image_answer}`; {agreement} of its answer's tokens repeated, {p.image_prompt_tokens} "
        "prompt tokens with the image). Both were given the image at the size the processor makes of it: llama.cpp "
        "resizes a larger image by its own limits, not the processor's, so it may see it in more tokens than "
        "training did; give it images at that size for the same answers.",
        "",
    ]


def how_to_run_vision(repo_id: str, name: str, gguf_names: list[str], gguf: GgufFiles | None) -> list[str]:
    """A vision-language model: transformers with its processor, llama.cpp's multimodal CLI and
    server with the projector, Ollama with both files."""
    question = (gguf.mmproj.image_question if gguf and gguf.mmproj else None) or "What is in this image?"
    example = example_image(gguf) or "photo.png"
    lines = [
        "## How to run it",
        "",
        "With transformers (its processor lays out the image's tokens):",
        "",
        "```python",
        "from PIL import Image",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        f'processor = AutoProcessor.from_pretrained("{repo_id}")',
        f'model = AutoModelForImageTextToText.from_pretrained("{repo_id}")',
        f'messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "{question}"}}]}}]',
        "text = processor.apply_chat_template(messages, add_generation_prompt=True)",
        f'inputs = processor(text=[text], images=[Image.open("{example}")], return_tensors="pt")',
        'out = model.generate(**inputs, max_new_tokens=32)[0, inputs["input_ids"].shape[1]:]',
        "print(processor.decode(out, skip_special_tokens=True))",
        "```",
        "",
    ]
    if not gguf_names or gguf is None or gguf.mmproj is None or not gguf.mmproj.passed:
        return lines
    mmproj = Path(gguf.mmproj.path).name
    return lines + [
        "With llama.cpp: its multimodal CLI, or its server (OpenAI-style `image_url` parts), each with the projector:",
        "",
        "```bash",
        *(f'llama-mtmd-cli -m gguf/{f} --mmproj gguf/{mmproj} --image {example} -p "{question}"' for f in gguf_names),
        f"llama-server -m gguf/{gguf_names[0]} --mmproj gguf/{mmproj}",
        "```",
        "",
        *ollama_lines(
            name,
            "the `Modelfile` names both files; whether Ollama runs an imported projector of this family "
            "depends on its version",
        ),
        "With LM Studio: put a model file and the projector in one folder of LM Studio's models folder.",
        "",
    ]


def ollama_lines(name: str, why: str) -> list[str]:
    """Creating and running the model in Ollama from the Modelfile beside the GGUF files."""
    return [
        f"With Ollama ({why}):",
        "",
        "```bash",
        "cd gguf",
        f"ollama create {name.lower()} -f Modelfile",
        f"ollama run {name.lower()}",
        "```",
        "",
    ]
