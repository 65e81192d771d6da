"""The Ollama Modelfile written beside each GGUF file: the chat template, stop tokens and
sampling parameters Ollama needs to run it as the model was trained."""

from __future__ import annotations

import json
from pathlib import Path

# Ollama's defaults for a ChatML model; the stop tokens come from the tokenizer itself.
OLLAMA_CHATML_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def _special_tokens(model_dir: Path) -> list[str]:
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    stops = []
    for key in ("eos_token", "pad_token"):
        tok = cfg.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok and tok not in stops:
            stops.append(tok)
    return stops


def modelfile(gguf_name: str, model_dir: Path, mmproj: str | None = None, temperature: float = 0.7) -> str:
    """An Ollama Modelfile for one GGUF file: template, stop tokens, parameters; a vision model's
    projector as a second FROM, the form Ollama imports a separate projector from."""
    lines = [f"FROM ./{gguf_name}"]
    if mmproj:
        lines += [
            f"FROM ./{mmproj}",
            "# the vision projector: whether Ollama runs an imported projector of this family depends on its",
            "# version; llama.cpp's llama-mtmd-cli runs both files as they are (see the model card)",
        ]
    lines += ["", f'TEMPLATE """{OLLAMA_CHATML_TEMPLATE}"""', ""]
    for stop in [*_special_tokens(model_dir), "<|im_start|>"]:
        lines.append(f'PARAMETER stop "{stop}"')
    lines += [f"PARAMETER temperature {temperature}", "PARAMETER num_ctx 2048", ""]
    return "\n".join(lines)
