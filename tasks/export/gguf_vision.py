"""The smoke test's vision half: a held-out image question asked of llama.cpp with the
projector (llama-cpp-python's libmtmd chat handler), beside the transformers model's answer.

The parent (which has torch) computes the transformers answers once; the child that runs
llama.cpp only asks and compares. Agreement is the share of the transformers answer's tokens
that llama.cpp's greedy answer repeats in order: the language model's own next-token agreement
is measured on the rows' text as for any text model.
"""

from __future__ import annotations

import base64
import mimetypes
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

ANSWER_TOKENS = 12  # greedy tokens each side answers with
QUESTIONS = 2  # held-out image questions asked of each file


class ImageQuestion(BaseModel):
    model_config = ConfigDict(frozen=True)

    question: str  # the user turn's text, asked after the image
    image: str  # an absolute path
    hf_answer: str
    hf_answer_ids: list[int]


def flattened(rows: list[dict]) -> list[dict]:
    """Rows with their content parts as plain text and no images: what the language model alone
    is compared on (its GGUF file holds no vision tower)."""

    def text(content: Any) -> Any:
        if not isinstance(content, list):
            return content
        return " ".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text")

    out = []
    for row in rows:
        turns = {
            k: v for k, v in row.items() if k in ("messages", "prompt", "chosen", "rejected") and isinstance(v, list)
        }
        out.append({k: [{**t, "content": text(t["content"])} for t in v] for k, v in turns.items()} or row)
    return out


def image_questions(model: Any, processor: Any, rows: list[dict], folder: Path, resized: Path) -> list[ImageQuestion]:
    """The first held-out rows with one image and a question: the transformers model's greedy
    answers, each image first resized as the processor resizes it (written under `resized`),
    so that both sides see the same pixels: llama.cpp resizes a Qwen2.5-VL image by its own
    limits, not the processor's (a 640x480 photo: 391 image tokens in llama.cpp, 12 in the tiny
    model's processor), which would compare two inputs instead of two models."""
    import torch
    from PIL import Image

    found = []
    for row in rows:
        turns = row.get("messages") or row.get("prompt")
        if len(row.get("images") or []) != 1 or not isinstance(turns, list) or len(found) == QUESTIONS:
            continue
        user = next((t for t in turns if t["role"] == "user" and isinstance(t["content"], list)), None)
        if user is None:
            continue
        question = " ".join(p["text"] for p in user["content"] if p.get("type") == "text")
        turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        with Image.open(folder / row["images"][0]) as picture:
            image = as_processed(processor, picture.convert("RGB"), resized / f"asked-{len(found)}.png")
        with Image.open(image) as picture:
            inputs = processor(text=[text], images=[picture.convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=ANSWER_TOKENS, do_sample=False)
        ids = out[0, inputs["input_ids"].shape[1] :].tolist()
        eos = processor.tokenizer.eos_token_id
        ids = ids[: ids.index(eos)] if eos in ids else ids  # the answer's text, as llama.cpp returns it
        answer = processor.batch_decode([ids], skip_special_tokens=True)[0]
        found.append(ImageQuestion(question=question, image=str(image), hf_answer=answer, hf_answer_ids=ids))
    return found


def as_processed(processor: Any, picture: Any, path: Path) -> Path:
    """The picture at the size the processor turns it into (its patch grid times the patch size,
    where it says: `image_grid_thw`), saved as PNG; unchanged where it does not say."""
    grid = processor.image_processor(images=[picture], return_tensors="np").get("image_grid_thw")
    patch = getattr(processor.image_processor, "patch_size", None)
    if grid is not None and patch:
        _, rows, columns = (int(n) for n in grid[0])
        picture = picture.resize((columns * patch, rows * patch))
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path.resolve()


def chat_handler(mmproj: Path) -> Any:
    """llama-cpp-python's generic libmtmd handler: the projector's own preprocessing, and the
    GGUF's own chat template."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    return MTMDChatHandler(clip_model_path=str(mmproj), verbose=False, use_gpu=False)


def ask(llm: Any, question: ImageQuestion) -> tuple[str, int, float]:
    """llama.cpp's greedy answer to one image question: its text, the prompt's tokens (the
    image's included), and its agreement with the transformers answer."""
    kind = mimetypes.guess_type(question.image)[0] or "image/png"
    url = f"data:{kind};base64," + base64.b64encode(Path(question.image).read_bytes()).decode()
    llm.reset()
    out = llm.create_chat_completion(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": question.question},
                ],
            }
        ],
        max_tokens=ANSWER_TOKENS,
        temperature=0.0,
        seed=0,
    )
    answer = out["choices"][0]["message"]["content"] or ""
    ours = llm.tokenize(answer.encode("utf-8"), add_bos=False, special=False) if answer else []
    theirs = question.hf_answer_ids
    same = 0
    while same < min(len(ours), len(theirs)) and ours[same] == theirs[same]:
        same += 1
    agreement = same / len(theirs) if theirs else 1.0
    return answer, int(out.get("usage", {}).get("prompt_tokens", 0)), agreement
