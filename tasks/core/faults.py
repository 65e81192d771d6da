"""Network faults sorted by kind, and the one retry loop every network call goes through.

Transient faults (connection cuts, timeouts, HTTP 408/429/5xx) are retried with backoff, and
a server's `Retry-After` is honoured (capped, so a runaway value cannot park a run for a
day); permanent ones (401, 402, 403, 404, other 4xx, offline mode) fail at once, because
asking again gets the same answer. huggingface_hub's own `http_backoff` covers only some of
its calls and ignores Retry-After, hence this module.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal, TypeVar

T = TypeVar("T")
Kind = Literal["transient", "permanent", "offline"]

RETRY_AFTER_CAP_S = 300.0


def causes(err: BaseException) -> list[BaseException]:
    """The exception and everything it was raised from (libraries wrap network errors)."""
    chain, seen = [], set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return chain


def _response(err: BaseException) -> object | None:
    return getattr(err, "response", None)


def status_of(err: BaseException) -> int | None:
    """The HTTP status anywhere in an exception's chain, if any."""
    for e in causes(err):
        status = getattr(_response(e), "status_code", None)
        if isinstance(status, int):
            return status
    return None


def is_offline(err: BaseException) -> bool:
    """HF_HUB_OFFLINE=1 (or its transformers/datasets twins): no call will be made this process."""
    return any(
        type(e).__name__ == "OfflineModeIsEnabled" or "offline mode is enabled" in str(e).lower() for e in causes(err)
    )


def offline_mode() -> bool:
    """Whether huggingface_hub (and transformers and datasets, which follow it) is switched offline."""
    import huggingface_hub.constants as constants

    return bool(constants.HF_HUB_OFFLINE)


def kind_of(err: BaseException) -> Kind:
    """Whether asking again can help."""
    if is_offline(err):
        return "offline"
    kind = _network_kind(err)
    # datasets words offline mode as a ConnectionError of its own: no network call can succeed
    return "offline" if kind == "transient" and offline_mode() else kind


def _network_kind(err: BaseException) -> Kind:
    """huggingface_hub 2.4 talks through `httpx2` (not `httpx`) and wraps a failed large-file
    upload in a RuntimeError whose cause is the network error, so the whole chain is read.
    """
    for e in causes(err):
        status = getattr(_response(e), "status_code", None)
        if isinstance(status, int):
            return "transient" if status in (408, 429) or status >= 500 else "permanent"
        if isinstance(e, ConnectionError | TimeoutError):
            return "transient"
        if any(c.__name__ in ("TransportError", "TimeoutException", "NetworkError") for c in type(e).__mro__):
            return "transient"
    return "permanent"


def retry_after_s(err: BaseException, now: datetime | None = None) -> float | None:
    """The wait a 429/503 answer asked for (seconds or an HTTP date), at most RETRY_AFTER_CAP_S."""
    for e in causes(err):
        headers = getattr(_response(e), "headers", None)
        value = headers.get("Retry-After") if headers is not None else None
        if not value:
            continue
        value = str(value).strip()
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                continue
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            seconds = (when - (now or datetime.now(UTC))).total_seconds()
        return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)
    return None


def pause(seconds: float) -> None:
    """The wait between attempts (a seam for tests, which do not wait)."""
    time.sleep(seconds)


def with_retries(
    fn: Callable[[], T],
    delays_s: tuple[float, ...],
    sleep: Callable[[float], None] | None = None,
    on_retry: Callable[[BaseException, float], object] | None = None,
    before_retry: Callable[[], T | None] | None = None,
) -> T:
    """Call `fn`; after a transient fault wait (the backoff step, or longer when the server
    said so) and call again, up to len(delays_s) more times. Anything else, and the last
    transient fault, propagates as raised: the caller words the refusal.

    `before_retry` may return a value that makes another call needless (a create request
    whose answer was lost but which the server applied, found by looking it up).
    """
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as e:
            if kind_of(e) != "transient" or attempt >= len(delays_s):
                e.add_note(f"finetune: {attempt + 1} attempt(s), fault kind {kind_of(e)}")
                raise
            wait = max(delays_s[attempt], retry_after_s(e) or 0.0)
            if on_retry is not None:
                on_retry(e, wait)
            (sleep or pause)(wait)
            attempt += 1
            if before_retry is not None:
                found = before_retry()
                if found is not None:
                    return found


def attempts_of(err: BaseException) -> int:
    """How many attempts `with_retries` made before giving up on `err` (1 when it did not run)."""
    for note in getattr(err, "__notes__", []):
        if note.startswith("finetune: "):
            return int(note.split()[1])
    return 1


def hub_read_failure(err: BaseException, kind: str, offline_switch: str, gated_fix: str) -> str:
    """Why reading a `kind` (model, dataset) from the Hub failed, by the kind of fault."""
    status = status_of(err)
    if is_offline(err) or offline_mode():
        return f"HF_HUB_OFFLINE=1 (or {offline_switch}=1) is set and the {kind} is not in the local cache"
    if status in (401, 403):
        return f"the Hub refused access (HTTP {status}): the {kind} is gated or private; {gated_fix}"
    if status == 404:
        return f"the Hub has no such {kind} (HTTP 404); check the id"
    if kind_of(err) == "transient":
        return f"the Hub did not answer after {attempts_of(err)} attempt(s): {type(err).__name__}: {err}"
    return f"{type(err).__name__}: {err}"


HUB_READ_DELAYS_S = (1.0, 3.0, 10.0)


def read_with_retries(fn: Callable[[], T], what: str, local: bool) -> T:
    """A read of a model or dataset: once from a local folder, with retries from the Hub."""
    return with_retries(fn, () if local else HUB_READ_DELAYS_S, on_retry=say_retry(f"reading {what}"))


def say_retry(what: str) -> Callable[[BaseException, float], None]:
    """A log line per retry, so a run that waits on the network says so (and why)."""

    def say(err: BaseException, wait_s: float) -> None:
        status = status_of(err)
        fault = f"HTTP {status}" if status else type(err).__name__
        message = f"{what}: {fault}, a transient fault; trying again in {wait_s:.1f} s"
        try:
            from prefect import get_run_logger

            get_run_logger().warning(message)
        except Exception:  # outside a flow or task run
            import sys

            print(message, file=sys.stderr)

    return say
