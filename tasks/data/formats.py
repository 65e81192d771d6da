"""Datasets as users have them: recognise a dataset's format by its content, say per method
whether it is READY, NEEDS MAPPING (with the exact spec lines) or INCOMPATIBLE, and convert
the common formats into the canonical columns the methods train on.

Conversions are declared in the spec (`conversion: sharegpt`, with `columns:` renaming the
user's columns to the names the conversion reads) and applied row by row in validation; the
validated rows are what the job trains on, so what was checked is what trains. No library
maps these community formats onto TRL's columns for validation, hence this module.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.core.errors import UserFacingError
from tasks.core.methods import METHODS, DataKind, method_definition
from tasks.data.images import image_parts
from tasks.data.schemas import shared_prefix

Verdict = Literal["READY", "NEEDS MAPPING", "INCOMPATIBLE"]
SAMPLE_ROWS = 50

# ShareGPT speaker names and their chat roles (the variants seen in public datasets)
SPEAKERS = {
    "human": "user",
    "user": "user",
    "prompter": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "function_response": "tool",
    "observation": "tool",
    "ipython": "tool",
}


class ConversionError(UserFacingError, ValueError):
    """A row the named conversion cannot read; says which row, which column and why."""


class FormatCandidate(BaseModel):
    """One way to read the dataset for a method."""

    model_config = ConfigDict(frozen=True)

    format: str = Field(description="what the data is, e.g. 'ShareGPT conversations'")
    verdict: Verdict
    trains_as: str | None = Field(None, description="the canonical format it becomes")
    conversion: str | None = None
    columns: dict[str, str] = Field(default_factory=dict, description="spec `columns:`, your column per expected one")
    note: str = ""

    def spec_lines(self) -> list[str]:
        lines = [f"conversion: {self.conversion}"] if self.conversion else []
        if self.columns:
            lines.append("columns: {" + ", ".join(f"{k}: {v}" for k, v in self.columns.items()) + "}")
        return lines


class MethodVerdict(BaseModel):
    model_config = ConfigDict(frozen=True)

    method: str
    verdict: Verdict
    candidates: list[FormatCandidate]
    why: str = ""

    def text(self) -> str:
        head = f"{self.method}: {self.verdict}"
        if self.verdict == "READY":
            ready = next(c for c in self.candidates if c.verdict == "READY")
            return f"{head} ({ready.format})"
        if self.verdict == "INCOMPATIBLE":
            return f"{head}: {self.why}"
        options = [c for c in self.candidates if c.verdict == "NEEDS MAPPING"]
        if len(options) == 1:
            c = options[0]
            return f"{head}: {c.format}; add to the spec:\n    " + "\n    ".join(c.spec_lines())
        alternatives = "\n".join(
            f"  - {c.format}: " + "; ".join(c.spec_lines()) + (f" ({c.note})" if c.note else "") for c in options
        )
        return f"{head}: more than one reading fits; choose one and add its lines to the spec:\n{alternatives}"


# --- conversions ---------------------------------------------------------------------------


def _sharegpt(row: dict[str, Any], kind: str) -> dict[str, Any]:
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"conversations must be a non-empty list of {{from, value}} turns, got {_short(turns)}")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise ValueError(f"turn {i + 1} must be {{from, value}}, got {_short(t)}")
        role = SPEAKERS.get(str(t["from"]).strip().lower())
        if role is None:
            raise ValueError(
                f"turn {i + 1} has from={_short(t['from'])}, not a known speaker ({', '.join(sorted(SPEAKERS))})"
            )
        messages.append({"role": role, "content": t["value"]})
    return {"messages": messages, **_rest(row, "conversations")}


def _alpaca(row: dict[str, Any], kind: str) -> dict[str, Any]:
    instruction, output = row["instruction"], row["output"]
    extra = row.get("input")
    prompt = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
    turns = [{"role": "user", "content": prompt}]
    if isinstance(row.get("system"), str) and row["system"].strip():
        turns.insert(0, {"role": "system", "content": row["system"]})
    rest = _rest(row, "instruction", "input", "output", "system")
    if kind == "prompts":  # the output becomes the reference answer the rewards read
        return {"prompt": turns, "answer": output, **rest}
    return {"messages": [*turns, {"role": "assistant", "content": output}], **rest}


IMAGE_MARK = "<image>"  # LLaVA's placeholder: where in a turn's text its image goes


def _parts(text: str) -> list[dict[str, str]]:
    """A LLaVA turn's text as content parts, an image part where each <image> stood."""
    parts: list[dict[str, str]] = []
    for i, piece in enumerate(text.split(IMAGE_MARK)):
        if i:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def _image_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, list | tuple) else [value]


def _llava(row: dict[str, Any], kind: str) -> dict[str, Any]:
    turns = _sharegpt(row, kind)["messages"]
    images = _image_list(row.get("images", row.get("image")))
    messages = [
        {"role": t["role"], "content": _parts(t["content"]) if isinstance(t["content"], str) else t["content"]}
        for t in turns
    ]
    return {"messages": messages, "images": images, **_rest(row, "conversations", "image", "images")}


INLINE_KEYS = ("image", "path", "url")  # where a part names its image, besides OpenAI's image_url


def _inline_ref(part: dict[str, Any]) -> Any:
    """The image an inline part names ({type: image, image|path|url: ...} or OpenAI's
    {type: image_url, image_url: {url}}), or None for a bare placeholder."""
    if part.get("type") == "image_url":
        ref = part.get("image_url")
        return ref.get("url") if isinstance(ref, dict) else ref
    return next((part[k] for k in INLINE_KEYS if part.get(k) is not None), None)


def _inline_images(row: dict[str, Any], kind: str) -> dict[str, Any]:
    images: list[Any] = []
    messages = []
    for turn in row["messages"]:
        content = turn.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") in ("image", "image_url"):
                    ref = _inline_ref(part)
                    if ref is None:
                        raise ValueError("an image part names no image (give it image, path or url)")
                    images.append(ref)
                    part = {"type": "image"}
                parts.append(part)
            content = parts
        messages.append({**turn, "content": content})
    return {"messages": messages, "images": images, **_rest(row, "messages", "images")}


def _image_text(row: dict[str, Any], kind: str) -> dict[str, Any]:
    prompt, answer = row.get("prompt"), row["completion"]
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"the answer must be non-empty text, got {_short(answer)}")
    user: list[dict[str, str]] = [{"type": "image"}]
    if isinstance(prompt, str) and prompt.strip():
        user.append({"type": "text", "text": prompt})
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return {"messages": messages, "images": [row["image"]], **_rest(row, "image", "prompt", "completion")}


_HH_MARKER = re.compile(r"\n\n(Human|Assistant):[ ]?")


def _hh_turns(text: str) -> list[dict[str, str]]:
    parts = _HH_MARKER.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    turns = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        turns.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return turns


def _hh_rlhf(row: dict[str, Any], kind: str) -> dict[str, Any]:
    chosen, rejected = _hh_turns(row["chosen"]), _hh_turns(row["rejected"])
    if not chosen or chosen[-1]["role"] != "assistant" or not rejected or rejected[-1]["role"] != "assistant":
        raise ValueError(
            "chosen and rejected must be 'Human: ... Assistant: ...' dialogues ending with an Assistant turn, "
            f"got chosen={_short(row['chosen'])}"
        )
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("chosen and rejected must share every turn but the last Assistant answer")
    pair = {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:], **_rest(row, "chosen", "rejected")}
    return _split(pair) if kind == "unpaired" else pair


def _split(pair: dict[str, Any]) -> list[dict[str, Any]]:
    """A preference pair as two unpaired rows: the chosen answer desirable, the rejected one
    not (KTO; what TRL's unpair_preference_dataset does, row by row here so that a bad row is
    named). A pair whose prompt is the shared first turns of both sides is cut there."""
    chosen, rejected = pair["chosen"], pair["rejected"]
    prompt = pair.get("prompt")
    if prompt is None:
        if not (_role_turns(chosen) and _role_turns(rejected)):
            raise ValueError(
                "without a prompt column, chosen and rejected must be conversations sharing their first turns"
            )
        n = shared_prefix(chosen, rejected)
        if n == 0 or n >= min(len(chosen), len(rejected)):
            raise ValueError("chosen and rejected share no leading turns (the prompt), or one is the other's prefix")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    rest = _rest(pair, "prompt", "chosen", "rejected")
    return [
        {"prompt": prompt, "completion": chosen, "label": True, **rest},
        {"prompt": prompt, "completion": rejected, "label": False, **rest},
    ]


def _unpair(row: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return _split(row)


def _repeated_prompt(row: dict[str, Any], kind: str) -> dict[str, Any] | list[dict[str, Any]]:
    """chosen and rejected as whole conversations that begin with the prompt (UltraFeedback
    binarized): the prompt column is dropped and the conversations' shared first turns are the
    prompt, so it is not given twice."""
    chosen, rejected = row["chosen"], row["rejected"]
    if not (_role_turns(chosen) and _role_turns(rejected)):
        raise ValueError(f"chosen and rejected must be conversations of {{role, content}} turns, got {_short(chosen)}")
    if chosen[0].get("content") != row["prompt"] and not isinstance(row["prompt"], list):
        raise ValueError(
            "chosen does not begin with the prompt; without this conversion the rows may be ready as they are"
        )
    pair = {"chosen": chosen, "rejected": rejected, **_rest(row, "prompt", "chosen", "rejected")}
    return _split(pair) if kind == "unpaired" else pair


SCORE_KEYS = ("overall_score", "score", "rating", "fine-grained_score")


def _score(completion: dict[str, Any]) -> float | None:
    for key in SCORE_KEYS:
        value = completion.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _ultrafeedback(row: dict[str, Any], kind: str) -> dict[str, Any]:
    completions = row["completions"]
    if not isinstance(completions, list) or len(completions) < 2:
        raise ValueError(f"completions must list at least two rated responses, got {_short(completions)}")
    scored = [(s, c.get("response")) for c in completions if isinstance(c, dict) and (s := _score(c)) is not None]
    scored = [(s, r) for s, r in scored if isinstance(r, str) and r.strip()]
    if len(scored) < 2:
        raise ValueError(f"fewer than two completions have a response and a score ({'/'.join(SCORE_KEYS)})")
    best, worst = max(scored, key=lambda x: x[0]), min(scored, key=lambda x: x[0])
    if best[0] == worst[0]:
        raise ValueError(f"every completion has the same score ({best[0]:g}): no preference to learn")
    pair = {
        "prompt": row["instruction"],
        "chosen": best[1],
        "rejected": worst[1],
        **_rest(row, "instruction", "completions"),
    }
    return _split(pair) if kind == "unpaired" else pair


class Conversion(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    reads: tuple[str, ...]
    optional: tuple[str, ...] = ()
    makes: str
    kinds: tuple[DataKind, ...]  # the kinds of data it makes (a method's `data`)
    describe: str
    fn: Callable[[dict[str, Any], str], dict[str, Any] | list[dict[str, Any]]]  # a list: one row makes several


CONVERSIONS: dict[str, Conversion] = {
    c.name: c
    for c in (
        Conversion(
            name="sharegpt",
            reads=("conversations",),
            makes="messages",
            kinds=("demonstrations",),
            describe="ShareGPT turns {from, value} (human/gpt/system/tool and variants) -> messages {role, content}",
            fn=_sharegpt,
        ),
        Conversion(
            name="llava",
            reads=("conversations",),
            optional=("image", "images"),
            makes="vision (messages + images)",
            kinds=("demonstrations",),
            describe="LLaVA rows: ShareGPT turns with <image> in their text, and image (or images) -> messages whose "
            "content parts put an image where each <image> stood, and the images",
            fn=_llava,
        ),
        Conversion(
            name="inline_images",
            reads=("messages",),
            makes="vision (messages + images)",
            kinds=("demonstrations",),
            describe="conversations whose image parts name their image ({type: image, image: PATH}, or OpenAI's "
            "{type: image_url, image_url: {url}}) -> {type: image} placeholders, and the images in a column",
            fn=_inline_images,
        ),
        Conversion(
            name="image_text",
            reads=("image", "completion"),
            optional=("prompt",),
            makes="vision (messages + images)",
            kinds=("demonstrations",),
            describe="one image per row with its answer (a caption, or the answer to the row's question) -> a user "
            "turn of the image [and the question], and the answer as the assistant's turn",
            fn=_image_text,
        ),
        Conversion(
            name="alpaca",
            reads=("instruction", "output"),
            optional=("input", "system"),
            makes="messages (sft), prompt + answer (grpo)",
            kinds=("demonstrations", "prompts"),
            describe="Alpaca instruction [+ input] -> user turn, output -> assistant turn (the answer for grpo)",
            fn=_alpaca,
        ),
        Conversion(
            name="hh_rlhf",
            reads=("chosen", "rejected"),
            makes="preference (dpo, orpo), two unpaired rows (kto)",
            kinds=("pairs", "unpaired"),
            describe="'Human:/Assistant:' dialogues -> the shared turns as prompt, the last answers as chosen/rejected "
            "(for kto: chosen labelled true, rejected false)",
            fn=_hh_rlhf,
        ),
        Conversion(
            name="ultrafeedback",
            reads=("instruction", "completions"),
            makes="preference (dpo, orpo), two unpaired rows (kto)",
            kinds=("pairs", "unpaired"),
            describe="rated completions -> the highest-rated as chosen, the lowest-rated as rejected "
            "(for kto: the highest-rated labelled true, the lowest false)",
            fn=_ultrafeedback,
        ),
        Conversion(
            name="repeated_prompt",
            reads=("prompt", "chosen", "rejected"),
            makes="implicit preference (dpo, orpo, reward), two unpaired rows (kto)",
            kinds=("pairs", "unpaired"),
            describe="conversations that repeat the prompt column as their first turn (UltraFeedback binarized) -> "
            "the prompt column dropped, the shared first turns as the prompt",
            fn=_repeated_prompt,
        ),
        Conversion(
            name="unpair",
            reads=("chosen", "rejected"),
            optional=("prompt",),
            makes="two unpaired rows per pair",
            kinds=("unpaired",),
            describe="a preference pair -> its prompt with the chosen answer labelled true, and with the rejected "
            "answer labelled false (a pair without a prompt column is cut at its shared first turns)",
            fn=_unpair,
        ),
    )
}


def _rest(row: dict[str, Any], *used: str) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in used}


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def conversion_for(name: str, method: str) -> Conversion:
    conversion = CONVERSIONS.get(name)
    if conversion is None:
        raise ConversionError(f"conversion: '{name}' is not a known conversion; use one of {', '.join(CONVERSIONS)}")
    if method_definition(method).data not in conversion.kinds:
        fits = [m.name for m in METHODS.values() if m.data in conversion.kinds]
        raise ConversionError(f"conversion: '{name}' makes {conversion.makes} data, for {'/'.join(fits)}, not {method}")
    return conversion


def convert_chunk(
    rows: list[dict[str, Any]], numbers: list[int], conversion: Conversion, source: str, method: str
) -> tuple[list[dict[str, Any]], list[int], list[str]]:
    """Apply a conversion to one chunk: the converted rows, their row numbers, and a line per
    row it cannot read (with the row number and the value at fault), for the caller to gather."""
    missing = [c for c in conversion.reads if rows and c not in rows[0]]
    if missing:
        raise ConversionError(
            f"{source}: conversion '{conversion.name}' reads column(s) {', '.join(conversion.reads)}; the data "
            f"lacks {', '.join(missing)} (its columns are {', '.join(rows[0]) if rows else 'none'}). "
            "Rename yours in the spec, e.g. `columns: {" + f"{missing[0]}: your_column" + "}`"
        )
    out, kept, bad = [], [], []
    kind = method_definition(method).data
    for number, row in zip(numbers, rows, strict=True):
        try:
            made = conversion.fn(row, kind)
            made = made if isinstance(made, list) else [made]
            out += made
            kept += [number] * len(made)  # rows made from one row keep its number: errors name the user's row
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            bad.append(f"row {number}: {e} (conversion '{conversion.name}': {conversion.describe})")
    return out, kept, bad


def convert_rows(rows: list[dict[str, Any]], conversion: Conversion, source: str, method: str) -> list[dict[str, Any]]:
    """Apply a conversion to every row; every row it cannot read is reported, with its value."""
    out, _, bad = convert_chunk(rows, list(range(1, len(rows) + 1)), conversion, source, method)
    if bad:
        shown = "\n  - ".join(bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ConversionError(f"{source}: {len(bad)} row(s) cannot be read by the conversion:\n  - {shown}{more}")
    return out


# --- recognition by content ------------------------------------------------------------------

PROMPT_NAMES = ("prompt", "question", "query", "instruction", "input", "problem")
ANSWER_NAMES = ("completion", "response", "answer", "output", "solution")
CHOSEN_NAMES = ("chosen", "response_j", "chosen_response", "response_chosen", "preferred", "better")
REJECTED_NAMES = ("rejected", "response_k", "rejected_response", "response_rejected", "dispreferred", "worse")
TEXT_NAMES = ("text", "content", "document", "body")
CHAT_NAMES = ("messages", "conversations", "conversation", "dialog", "dialogue", "chat", "turns")
REFERENCE_NAMES = ("answer", "solution", "ground_truth", "reference", "target", "tests", "test_cases")


def _values(rows: list[dict[str, Any]], column: str) -> list[Any]:
    return [r.get(column) for r in rows if r.get(column) is not None]


def _all(rows: list[dict[str, Any]], column: str, test: Callable[[Any], bool]) -> bool:
    values = _values(rows, column)
    return bool(values) and all(test(v) for v in values)


def _is_text(v: Any) -> bool:
    return isinstance(v, str)


def _turns_with(keys: tuple[str, str]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and bool(v) and all(isinstance(t, dict) and set(keys) <= set(t) for t in v)


_role_turns = _turns_with(("role", "content"))
_sharegpt_turns = _turns_with(("from", "value"))


def _text_or_turns(v: Any) -> bool:
    return isinstance(v, str) or _role_turns(v)


def _hh_text(v: Any) -> bool:
    return isinstance(v, str) and "Human:" in v and "Assistant:" in v


def _rated(v: Any) -> bool:
    return isinstance(v, list) and len(v) >= 2 and all(isinstance(c, dict) and "response" in c for c in v)


def _first(rows: list[dict[str, Any]], names: tuple[str, ...], test: Callable[[Any], bool]) -> str | None:
    columns = list(rows[0]) if rows else []
    return next((n for n in names if n in columns and _all(rows, n, test)), None)


def _sft_chats(rows: list[dict[str, Any]]) -> list[FormatCandidate]:
    """Conversation columns: {role, content} turns train as they are, ShareGPT {from, value}
    turns through the `sharegpt` conversion."""
    found: list[FormatCandidate] = []
    for col in CHAT_NAMES:
        if col in (rows[0] if rows else {}):
            if _all(rows, col, _role_turns):
                ready = col == "messages"
                found.append(
                    FormatCandidate(
                        format=f"chat turns {{role, content}} in '{col}'",
                        verdict="READY" if ready else "NEEDS MAPPING",
                        trains_as="messages",
                        columns={} if ready else {"messages": col},
                    )
                )
            elif _all(rows, col, _sharegpt_turns):
                found.append(
                    FormatCandidate(
                        format=f"ShareGPT conversations {{from, value}} in '{col}'",
                        verdict="NEEDS MAPPING",
                        trains_as="messages",
                        conversion="sharegpt",
                        columns={} if col == "conversations" else {"conversations": col},
                    )
                )
    return found


def _sft_pairs(rows: list[dict[str, Any]], alpaca: bool) -> list[FormatCandidate]:
    """Prompt/answer columns, and preference pairs trained on their chosen answers; an Alpaca
    dataset's instruction/output are left to its conversion rather than offered twice."""
    found: list[FormatCandidate] = []
    prompt = _first(rows, PROMPT_NAMES, _text_or_turns)
    answer = _first(rows, ANSWER_NAMES, _text_or_turns)
    chosen = _first(rows, CHOSEN_NAMES, _text_or_turns)
    if chosen and _all(rows, chosen, _whole_chat):  # the chosen side is a whole conversation, prompt included
        found.append(
            FormatCandidate(
                format=f"preference pairs: train on the chosen conversations ('{chosen}')",
                verdict="NEEDS MAPPING",
                trains_as="messages",
                columns={"messages": chosen},
                note="the rejected answers are left out",
            )
        )
    elif prompt and chosen and not answer:
        found.append(
            FormatCandidate(
                format=f"preference pairs: train on the chosen answers ('{prompt}', '{chosen}')",
                verdict="NEEDS MAPPING",
                trains_as="prompt_completion",
                columns={"completion": chosen} if prompt == "prompt" else {"prompt": prompt, "completion": chosen},
                note="the rejected answers are left out",
            )
        )
    if prompt and answer and not alpaca:
        ready = (prompt, answer) == ("prompt", "completion")
        found.append(
            FormatCandidate(
                format=f"prompt/response pairs ('{prompt}', '{answer}')",
                verdict="READY" if ready else "NEEDS MAPPING",
                trains_as="prompt_completion",
                columns={} if ready else {"prompt": prompt, "completion": answer},
            )
        )
    return found


def _whole_chat(v: Any) -> bool:
    """A conversation with its own user turn and an assistant answer last."""
    return _role_turns(v) and any(t.get("role") == "user" for t in v) and v[-1].get("role") == "assistant"


def _image_parts(v: Any) -> bool:
    """A conversation with at least one {type: image} part."""
    return _role_turns(v) and image_parts(v) > 0


def _inline_parts(v: Any) -> bool:
    """A conversation with an image part that names its image (no `images` column holds them)."""
    return _role_turns(v) and any(
        isinstance(p, dict) and p.get("type") in ("image", "image_url") and _inline_ref(p) is not None
        for t in v
        if isinstance(t["content"], list)
        for p in t["content"]
    )


def _llava_turns(v: Any) -> bool:
    return _sharegpt_turns(v) and any(IMAGE_MARK in str(t["value"]) for t in v)


def _vision(rows: list[dict[str, Any]]) -> list[FormatCandidate]:
    """Rows with images: conversations with image parts (TRL's own form), LLaVA rows, and one image
    with its caption or question and answer (an image folder's metadata)."""
    columns = set(rows[0]) if rows else set()
    if "messages" in columns and "images" not in columns and any(_inline_parts(v) for v in _values(rows, "messages")):
        return [
            FormatCandidate(
                format="conversations whose image parts name their images ('messages')",
                verdict="NEEDS MAPPING",
                trains_as="vision",
                conversion="inline_images",
            )
        ]
    if {"messages", "images"} <= columns and any(_image_parts(v) for v in _values(rows, "messages")):
        return [
            FormatCandidate(
                format="conversations with images ('messages' + 'images')", verdict="READY", trains_as="vision"
            )
        ]
    chat = _first(rows, CHAT_NAMES, _sharegpt_turns)
    if chat and columns & {"image", "images"} and any(_llava_turns(v) for v in _values(rows, chat)):
        return [
            FormatCandidate(
                format=f"LLaVA conversations with <image> in '{chat}'",
                verdict="NEEDS MAPPING",
                trains_as="vision",
                conversion="llava",
                columns={} if chat == "conversations" else {"conversations": chat},
            )
        ]
    answer = _first(rows, (*ANSWER_NAMES, "caption", "text"), _is_text)
    if "image" in columns and answer:
        prompt = _first(rows, PROMPT_NAMES, _is_text)
        mapping = {"completion": answer} | ({"prompt": prompt} if prompt else {})
        return [
            FormatCandidate(
                format=f"one image per row with {'a question and answer' if prompt else 'its text'} ('image', "
                + ", ".join(f"'{c}'" for c in mapping.values())
                + ")",
                verdict="NEEDS MAPPING",
                trains_as="vision",
                conversion="image_text",
                columns={k: v for k, v in mapping.items() if k != v},
            )
        ]
    return []


def _sft(rows: list[dict[str, Any]]) -> list[FormatCandidate]:
    """Every way SFT can read the rows, in order: images with their text, conversations, Alpaca,
    prompt/answer pairs, plain text. Rows with images are read with them or not at all: leaving
    them out is the user's choice to make (drop the image column), not a reading to offer."""
    if vision := _vision(rows):
        return vision
    found = _sft_chats(rows)
    alpaca = bool(_first(rows, ("instruction",), _is_text) and _first(rows, ("output",), _is_text))
    if alpaca:
        found.append(
            FormatCandidate(
                format="Alpaca instruction/input/output",
                verdict="NEEDS MAPPING",
                trains_as="messages",
                conversion="alpaca",
            )
        )
    found += _sft_pairs(rows, alpaca)
    text = _first(rows, TEXT_NAMES, _is_text)
    if text:
        found.append(
            FormatCandidate(
                format=f"plain text in '{text}'",
                verdict="READY" if text == "text" else "NEEDS MAPPING",
                trains_as="text",
                columns={} if text == "text" else {"text": text},
                note="trains on the whole text (continued pre-training), not on answers",
            )
        )
    return found


def _vision_pairs(rows: list[dict[str, Any]]) -> list[FormatCandidate]:
    """Pairs whose prompt shows images first (TRL's form for DPO on a vision-language model)."""
    columns = set(rows[0]) if rows else set()
    if {"prompt", "chosen", "rejected", "images"} <= columns and any(_image_parts(v) for v in _values(rows, "prompt")):
        what = "preference pairs after images ('prompt' with image parts + 'images')"
        return [FormatCandidate(format=what, verdict="READY", trains_as="vision_preference")]
    return []


def _pairs(rows: list[dict[str, Any]]) -> list[FormatCandidate]:
    found = []
    chosen = _first(rows, CHOSEN_NAMES, _text_or_turns)
    rejected = _first(rows, REJECTED_NAMES, _text_or_turns)
    prompt = _first(rows, PROMPT_NAMES, _text_or_turns)
    if chosen and rejected and _all(rows, chosen, _hh_text) and not prompt:
        found.append(
            FormatCandidate(
                format="HH-RLHF dialogues ('Human:'/'Assistant:' in chosen and rejected)",
                verdict="NEEDS MAPPING",
                trains_as="preference",
                conversion="hh_rlhf",
                columns={k: v for k, v in (("chosen", chosen), ("rejected", rejected)) if k != v},
            )
        )
    elif chosen and rejected and prompt and _repeats_prompt(rows, prompt, chosen):
        found.append(
            FormatCandidate(
                format=f"conversations in '{chosen}'/'{rejected}' that repeat '{prompt}' (UltraFeedback binarized)",
                verdict="NEEDS MAPPING",
                trains_as="implicit_preference",
                conversion="repeated_prompt",
                columns={k: v for k, v in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)) if k != v},
            )
        )
    elif chosen and rejected and prompt:
        mapping = {k: v for k, v in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)) if k != v}
        found.append(
            FormatCandidate(
                format=f"preference pairs ('{prompt}', '{chosen}', '{rejected}')",
                verdict="NEEDS MAPPING" if mapping else "READY",
                trains_as="preference",
                columns=mapping,
            )
        )
    elif chosen and rejected and _all(rows, chosen, _role_turns):
        mapping = {k: v for k, v in (("chosen", chosen), ("rejected", rejected)) if k != v}
        found.append(
            FormatCandidate(
                format="conversations with the prompt as their shared first turns",
                verdict="NEEDS MAPPING" if mapping else "READY",
                trains_as="implicit_preference",
                columns=mapping,
            )
        )
    completions = _first(rows, ("completions",), _rated)
    if completions:
        source = _first(rows, ("instruction", "prompt", "question"), _is_text)
        if source:
            found.append(
                FormatCandidate(
                    format="UltraFeedback-style rated completions",
                    verdict="NEEDS MAPPING",
                    trains_as="preference",
                    conversion="ultrafeedback",
                    columns={} if source == "instruction" else {"instruction": source},
                )
            )
    return found


LABEL_NAMES = ("label", "desirable", "is_desirable", "kto_label")


def _unpaired(rows: list[dict[str, Any]]) -> list[FormatCandidate]:
    """Single answers with a label train as they are; pairs (and what becomes pairs) are split
    into a desirable and an undesirable row. A label that is not a boolean is still read as
    one here, so that validation names each row whose label is wrong instead of refusing the set."""
    prompt = _first(rows, PROMPT_NAMES, _text_or_turns)
    answer = _first(rows, ANSWER_NAMES, _text_or_turns)
    label = _first(rows, LABEL_NAMES, lambda v: True)
    if prompt and answer and label:
        mapping = {k: v for k, v in (("prompt", prompt), ("completion", answer), ("label", label)) if k != v}
        return [
            FormatCandidate(
                format=f"answers labelled desirable or not ('{prompt}', '{answer}', '{label}')",
                verdict="NEEDS MAPPING" if mapping else "READY",
                trains_as="unpaired",
                columns=mapping,
            )
        ]
    split = "each pair becomes two rows: the chosen answer labelled true, the rejected one false"
    return [
        c.model_copy(
            update={
                "trains_as": "unpaired",
                "verdict": "NEEDS MAPPING",
                "conversion": c.conversion or "unpair",
                "note": (c.note + "; " if c.note else "") + split,
            }
        )
        for c in _pairs(rows)
    ]


def _repeats_prompt(rows: list[dict[str, Any]], prompt: str, chosen: str) -> bool:
    """A text prompt that the chosen conversation repeats as its first turn."""
    return _all(rows, prompt, _is_text) and all(
        _role_turns(r.get(chosen)) and r[chosen][0].get("content") == r.get(prompt) for r in rows if r.get(chosen)
    )


def _kto(rows: list[dict[str, Any]]) -> bool:
    return bool(
        _first(rows, PROMPT_NAMES, _text_or_turns)
        and _first(rows, ANSWER_NAMES, _text_or_turns)
        and _first(rows, ("label",), lambda v: isinstance(v, bool))
    )


def _prompts(rows: list[dict[str, Any]]) -> list[FormatCandidate]:
    if _first(rows, ("instruction",), _is_text) and _first(rows, ("output",), _is_text):
        return [
            FormatCandidate(
                format="Alpaca instruction/input/output",
                verdict="NEEDS MAPPING",
                trains_as="prompt_only",
                conversion="alpaca",
                note="instruction + input become the prompt, output the reference answer (`answer`)",
            )
        ]
    prompt = _first(rows, PROMPT_NAMES, _text_or_turns)
    if not prompt:
        return []
    references = [n for n in REFERENCE_NAMES if n in rows[0] and n != prompt]
    mapping = {} if prompt == "prompt" else {"prompt": prompt}
    for wanted, names in (("answer", ("solution", "ground_truth", "reference", "target")), ("tests", ("test_cases",))):
        have = next((n for n in names if n in references), None)
        if wanted not in references and have:
            mapping[wanted] = have  # the shipped rewards read `answer` and `tests`
    note = f"reference columns for the rewards: {', '.join(references)}" if references else "no reference answers"
    return [
        FormatCandidate(
            format=f"prompts in '{prompt}'",
            verdict="NEEDS MAPPING" if mapping else "READY",
            trains_as="prompt_only",
            columns=mapping,
            note=note,
        )
    ]


# what each kind of data can be read from (a method's `data`)
READERS: dict[str, Callable[[list[dict[str, Any]]], list[FormatCandidate]]] = {
    "demonstrations": _sft,
    "pairs": lambda rows: _vision_pairs(rows) or _pairs(rows),
    "unpaired": _unpaired,
    "prompts": _prompts,
}
KTO_ROWS = (
    "this is KTO-style data (prompt, completion, label): the rows labelled false are answers not to learn, and "
    "imitating the rows would learn them; keep only the rows labelled true (and drop `label`) to train on them"
)
KTO_NOT_PAIRS = (
    "this is KTO-style unpaired data (prompt, completion, label): each answer is judged alone, and a pair method "
    "needs a chosen and a rejected answer to the same prompt; pairing them would invent preferences"
)


VISION_FORMATS = ("vision", "vision_preference")  # formats whose rows carry images
IMAGES_NOT_HERE = (
    "the rows have images, and {method} does not train on images yet (SFT and DPO do: docs/vision-language.md); "
    "training without them would teach answers about pictures the model never sees"
)
IMAGES_UNREAD = (
    "the rows have images, but not in a form {method} reads with them: for SFT, messages with {{type: image}} parts "
    "and an images column, LLaVA rows (image, and conversations with <image>), or one image per row with its text "
    "(an image folder); for DPO, prompt (turns with {{type: image}} parts), chosen, rejected and images"
)


def _has_images(rows: list[dict[str, Any]]) -> bool:
    """Rows that carry images: an image column with values, or image parts in a conversation."""
    for row in rows:
        if any(row.get(c) not in (None, [], "") for c in ("images", "image")):
            return True
        for value in row.values():
            if isinstance(value, list) and any(
                isinstance(t, dict)
                and isinstance(t.get("content"), list)
                and any(isinstance(p, dict) and p.get("type") in ("image", "image_url") for p in t["content"])
                for t in value
            ):
                return True
    return False


def recognise(rows: list[dict[str, Any]], method: str) -> MethodVerdict:
    """What the rows are for `method`, judged on the first SAMPLE_ROWS rows."""
    sample, definition = rows[:SAMPLE_ROWS], method_definition(method)
    if definition.data == "demonstrations" and _kto(sample):
        return MethodVerdict(method=method, verdict="INCOMPATIBLE", candidates=[], why=KTO_ROWS)
    if _has_images(sample) and not set(VISION_FORMATS) & set(definition.formats):
        return MethodVerdict(
            method=method, verdict="INCOMPATIBLE", candidates=[], why=IMAGES_NOT_HERE.format(method=method)
        )
    candidates = READERS[definition.data](sample)
    if _has_images(sample) and not any(c.trains_as in VISION_FORMATS for c in candidates):
        return MethodVerdict(
            method=method, verdict="INCOMPATIBLE", candidates=[], why=IMAGES_UNREAD.format(method=method)
        )
    if any(c.verdict == "READY" for c in candidates):
        return MethodVerdict(method=method, verdict="READY", candidates=candidates)
    if candidates:
        return MethodVerdict(method=method, verdict="NEEDS MAPPING", candidates=candidates)
    columns = ", ".join(sample[0]) if sample else "none"
    why = KTO_NOT_PAIRS if definition.data == "pairs" and _kto(sample) else definition.incompatible
    return MethodVerdict(method=method, verdict="INCOMPATIBLE", candidates=[], why=f"{why}; columns: {columns}")
