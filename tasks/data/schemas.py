"""The pandera schema of each canonical dataset format, and the element checks they run.

One schema per format, checked lazily so every bad row is reported at once; the checks are
plain functions of a cell (or of a row, for checks across columns) so they read as the rules
a user is told about.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa

ROLES = ("system", "user", "assistant", "tool")


def plain(value: Any) -> Any:
    """Parquet and `datasets` hand back numpy arrays for list columns; make them lists."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


# A conversation column is judged in one pass per row (`turn_code`), into a bit per rule; the
# schema's checks then test those bits vectorised. Four element-wise checks each walking every
# conversation cost four times as much, which at millions of rows is most of the validation.
NOT_TURNS, ROLE_UNKNOWN, EMPTY_TEXT, BAD_ORDER = 1, 2, 4, 8
ENDS_WITH_USER, HAS_TOOL = 16, 32  # legal; counted for the report
ANOMALIES = {ENDS_WITH_USER: "ends with a user turn (it is not trained on)", HAS_TOOL: "has tool turns"}
EMPTY_OTHER_SHIFT = 8  # empty system/tool turns, counted in the bits from here up
TURN_RULES = {
    NOT_TURNS: "must be a non-empty list of turns, each {role, content}",
    ROLE_UNKNOWN: f"every turn's role must be one of {', '.join(ROLES)}",
    EMPTY_TEXT: "every user and assistant turn needs non-empty text content",
    BAD_ORDER: "turns must go [system], user, assistant, user, ... (no repeats) with at least one assistant turn",
}
CODE_COLUMNS = {"_turns": "messages"}  # code column -> the column whose values it judges


def part_text(content: list) -> str | None:
    """A turn's content given as parts ({type: text, text} / {type: image}) as the text the
    rules judge: its text, with an image standing for content; None when a part is malformed."""
    text = []
    for part in content:
        kind = part.get("type") if part.__class__ is dict else None
        if kind == "image":
            text.append("\0")
        elif kind == "text" and isinstance(part.get("text"), str):
            text.append(part["text"])
        else:
            return None
    return "".join(text)


def turn_code(v: Any, parts: bool = False) -> int:
    """The rule bits a conversation breaks (0 when it is good); null is left to not-nullable.
    With `parts`, a turn's content may be a list of text and image parts (vision rows).
    One pass over the turns, written for speed: it runs once per row of every dataset."""
    if v is None or (v.__class__ is float and v != v):
        return 0
    if v.__class__ is not list or not v:
        return NOT_TURNS
    code = empty_other = 0
    last = role = None  # `last`: the last user or assistant role seen
    for i, t in enumerate(v):
        if t.__class__ is not dict:
            return NOT_TURNS
        role, content = t.get("role", t), t.get("content", t)
        if role is t or content is t:  # a key is missing
            return NOT_TURNS
        if parts and content.__class__ is list:
            content = part_text(content)
            if content is None:
                return NOT_TURNS
        if role == "user" or role == "assistant":
            if content.__class__ is not str or not content or content.isspace():
                code |= EMPTY_TEXT
            if role == last or (last is None and role == "assistant"):
                code |= BAD_ORDER
            last = role
        elif role == "system" or role == "tool":
            if role == "system" and i:  # a system turn comes first or not at all
                code |= BAD_ORDER
            elif role == "tool":
                code |= HAS_TOOL
            if not str(content or "").strip():
                empty_other += 1
        else:
            code |= ROLE_UNKNOWN
    if last is None or (last == "user" and not any(t.get("role") == "assistant" for t in v)):
        code |= BAD_ORDER
    if code & ROLE_UNKNOWN:
        code &= ~BAD_ORDER  # the order of unknown roles means nothing
    if role == "user":
        code |= ENDS_WITH_USER
    return code | empty_other << EMPTY_OTHER_SHIFT


# --- element checks: each returns True for a good value; the rules are turn_code's --------


def _is_turn_list(v: Any) -> bool:
    return isinstance(v, list) and not turn_code(v) & NOT_TURNS


def _roles_known(v: Any) -> bool:
    return not turn_code(v) & ROLE_UNKNOWN


def _turn_text_present(v: Any) -> bool:
    return not turn_code(v) & EMPTY_TEXT


def _role_order(v: Any) -> bool:
    return not turn_code(v) & BAD_ORDER


def with_turn_codes(df: pd.DataFrame, parts: bool = False) -> pd.DataFrame:
    """The frame with its `_turns` code column, which the messages schema checks."""
    codes = np.fromiter((turn_code(v, parts) for v in df["messages"].tolist()), dtype=np.int64, count=len(df))
    return df.assign(_turns=codes)


def _turn_code_checks() -> list[pa.Check]:
    return [pa.Check(lambda s, bit=bit: (s & bit) == 0, error=rule) for bit, rule in TURN_RULES.items()]


def _is_text_or_turns(v: Any) -> bool:
    return isinstance(v, str) or _is_turn_list(v)


def _not_empty(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip() != ""
    return not isinstance(v, list) or len(v) > 0


def _text_checks(what: str) -> list[pa.Check]:
    return [
        pa.Check(_is_text_or_turns, element_wise=True, error=f"{what} must be a string (or a list of turns)"),
        pa.Check(_not_empty, element_wise=True, error=f"{what} must not be empty"),
    ]


def _canonical(v: Any) -> str:
    return json.dumps(v, sort_keys=True, ensure_ascii=False) if not isinstance(v, str) else v.strip()


def _sides_differ(df: pd.DataFrame) -> pd.Series:
    return df["chosen"].map(_canonical) != df["rejected"].map(_canonical)


def _same_kind(df: pd.DataFrame) -> pd.Series:
    kinds = [df[c].map(lambda v: isinstance(v, list)) for c in df.columns if c in ("prompt", "chosen", "rejected")]
    return pd.concat(kinds, axis=1).nunique(axis=1) == 1


def shared_prefix(chosen: Any, rejected: Any) -> int:
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    return n


def _implicit_prompt_ok(df: pd.DataFrame) -> pd.Series:
    """Both sides are conversations sharing at least one leading turn (the prompt), then each
    goes on with its own answer."""

    def ok(row: pd.Series) -> bool:
        c, r = row["chosen"], row["rejected"]
        if not (_is_turn_list(c) and _is_turn_list(r)):
            return False
        n = shared_prefix(c, r)
        return 0 < n < min(len(c), len(r)) and c[-1]["role"] == r[-1]["role"] == "assistant"

    return df.apply(ok, axis=1)


def _conversation_order_ok(df: pd.DataFrame) -> pd.Series:
    """prompt + each side, when given as turns, follow the chat role order."""

    def ok(row: pd.Series) -> bool:
        prompt = row["prompt"] if "prompt" in row and isinstance(row["prompt"], list) else []
        for side in ("chosen", "rejected"):
            turns = row[side]
            if isinstance(turns, list) and _is_turn_list(turns) and not _role_order(prompt + turns):
                return False
        return True

    return df.apply(ok, axis=1)


def _preference_schema(fmt: str) -> pa.DataFrameSchema:
    parts = fmt == "vision_preference"  # turns may hold image and text parts
    present = (lambda v: not turn_code(v, True) & EMPTY_TEXT) if parts else _turn_text_present
    sides = {
        side: pa.Column(
            None,
            nullable=False,
            checks=_text_checks(side)
            + [
                pa.Check(
                    _roles_known,
                    element_wise=True,
                    error=f"{side}: every turn's role must be one of {', '.join(ROLES)}",
                ),
                pa.Check(present, element_wise=True, error=f"{side}: every user and assistant turn needs text"),
            ],
        )
        for side in ("chosen", "rejected")
    }
    if fmt in ("preference", "vision_preference"):
        sides = {"prompt": pa.Column(None, nullable=False, checks=_text_checks("prompt")), **sides}
    if parts:
        sides["images"] = _images_column()
    checks = [
        pa.Check(_sides_differ, error="chosen and rejected are identical: the pair teaches nothing"),
        pa.Check(_same_kind, error="prompt, chosen and rejected must all be text or all be lists of turns"),
        pa.Check(
            _conversation_order_ok, error="prompt + answer turns break the role order [system], user, assistant, ..."
        ),
    ]
    if fmt == "implicit_preference":
        checks.append(
            pa.Check(
                _implicit_prompt_ok,
                error="without a prompt column, chosen and rejected must be conversations that share their leading "
                "turns (the prompt) and each end with a different assistant turn",
            )
        )
    return pa.DataFrameSchema(sides, checks=checks, strict=False, coerce=False)


def _prompt_answer_order_ok(df: pd.DataFrame) -> pd.Series:
    """prompt + completion, when given as turns, follow the chat role order."""

    def ok(row: pd.Series) -> bool:
        prompt, answer = row["prompt"], row["completion"]
        return not (_is_turn_list(prompt) and _is_turn_list(answer)) or _role_order(prompt + answer)

    return df.apply(ok, axis=1)


def _unpaired_schema() -> pa.DataFrameSchema:
    """KTO's rows: a prompt, one answer and whether it is desirable (a boolean, not 0/1 or text:
    a label read the wrong way round would teach the opposite)."""
    columns = {
        "prompt": pa.Column(None, nullable=False, checks=_text_checks("prompt")),
        "completion": pa.Column(
            None,
            nullable=False,
            checks=_text_checks("completion")
            + [pa.Check(_roles_known, element_wise=True, error=f"every turn's role must be one of {', '.join(ROLES)}")],
        ),
        "label": pa.Column(
            None,
            nullable=False,
            checks=[
                pa.Check(
                    lambda v: isinstance(v, bool | np.bool_),
                    element_wise=True,
                    error="label must be true (a desirable answer) or false (an undesirable one)",
                )
            ],
        ),
    }
    checks = [
        pa.Check(
            lambda df: _same_kind(df[["prompt", "completion"]]),
            error="prompt and completion must both be text or both turns",
        ),
        pa.Check(
            _prompt_answer_order_ok,
            error="prompt + completion turns break the role order [system], user, assistant, ...",
        ),
    ]
    return pa.DataFrameSchema(columns, checks=checks, strict=False, coerce=False)


def _images_column() -> pa.Column:
    """A vision row's images: a list, one path, or none (a row without the key: NaN)."""
    return pa.Column(
        None,
        nullable=True,
        checks=pa.Check(
            lambda v: v is None or v != v or isinstance(v, list | str),
            element_wise=True,
            error="images must be a list (or one path)",
        ),
    )


def schema_for(fmt: str) -> pa.DataFrameSchema:
    """The pandera schema of one SFT dataset format (canonical column names).

    No dtype is pinned: pandas may store text as object or string dtype, and a cell may hold
    text or a list of turns; the element checks decide what is acceptable."""
    if fmt in ("messages", "vision"):
        columns = {
            "messages": pa.Column(None, nullable=False),
            "_turns": pa.Column(int, checks=_turn_code_checks()),  # from with_turn_codes
        }
        if fmt == "vision":  # what each image is, and whether it opens, is checked per row (tasks/data/images.py)
            columns["images"] = _images_column()
    elif fmt == "prompt_completion":
        columns = {
            "prompt": pa.Column(None, nullable=False, checks=_text_checks("prompt")),
            "completion": pa.Column(None, nullable=False, checks=_text_checks("completion")),
        }
    elif fmt in ("preference", "implicit_preference", "vision_preference"):
        return _preference_schema(fmt)
    elif fmt == "unpaired":
        return _unpaired_schema()
    elif fmt == "prompt_only":
        columns = {
            "prompt": pa.Column(
                None,
                nullable=False,
                checks=[
                    *_text_checks("prompt"),
                    pa.Check(
                        _roles_known, element_wise=True, error=f"every turn's role must be one of {', '.join(ROLES)}"
                    ),
                    pa.Check(
                        lambda v: not isinstance(v, list) or not _is_turn_list(v) or v[-1]["role"] == "user",
                        element_wise=True,
                        error="a conversational prompt must end with a user turn (the model answers it)",
                    ),
                ],
            )
        }
    elif fmt == "text":
        columns = {
            "text": pa.Column(
                None,
                nullable=False,
                checks=[
                    pa.Check(lambda v: isinstance(v, str), element_wise=True, error="text must be a string"),
                    pa.Check(_not_empty, element_wise=True, error="text must not be empty"),
                ],
            )
        }
    else:
        raise ValueError(f"unknown format {fmt}")
    return pa.DataFrameSchema(columns, strict=False, coerce=False)
