"""Access to the Hugging Face Hub shared by every phase that talks to it (the Jobs backend, the
publish step): where the token comes from, keeping it out of text, and the API client."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from tasks.core.errors import UserFacingError

SECRET_BLOCK_ENV = "FINETUNE_HF_TOKEN_BLOCK"  # name of a Prefect Secret block holding the token


DEFAULT_SECRET_BLOCK = "hf-token"


XET_HOSTS = {"huggingface.co", "hf.co"}


class DebugSwitchRefused(UserFacingError, RuntimeError):
    """A switch that logs request bodies is on while a token is in use."""


def stored_token() -> str | None:
    """The token `hf auth login` saved (huggingface_hub's own lookup: HF_TOKEN, then the token file)."""
    from huggingface_hub import get_token

    return get_token()


def resolve_token() -> str | None:
    """HF_TOKEN from the environment, the token `hf auth login` stored, else the Prefect
    Secret block (if a server has one)."""
    token = os.environ.get("HF_TOKEN") or stored_token()
    if token:
        return token
    try:
        from prefect.blocks.system import Secret

        return str(Secret.load(os.environ.get(SECRET_BLOCK_ENV, DEFAULT_SECRET_BLOCK)).get())
    except Exception:  # no server, no block: the caller reports a missing token
        return None


def scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def uses_xet(endpoint: str | None) -> bool:
    """Xet only on huggingface.co; another Hub-compatible server (a mirror, a stand-in) gets
    git-LFS, which every such server speaks. FINETUNE_HUB_XET=1 forces Xet."""
    if os.environ.get("FINETUNE_HUB_XET") == "1":
        return True
    return not endpoint or urlsplit(endpoint).hostname in XET_HOSTS


DEBUG_SWITCHES = ("HF_DEBUG",)


def refuse_request_dumps(token: str | None) -> None:
    """With HF_DEBUG on, huggingface_hub logs every request as a curl command, headers and
    body included, which is where a token travels (and a Job's secrets). Refused while a
    token is in use, rather than trusting every log line to be redacted."""
    import huggingface_hub.constants as hub_constants

    on = [name for name in DEBUG_SWITCHES if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")]
    if hub_constants.HF_DEBUG and not on:
        on = ["HF_DEBUG (set in huggingface_hub.constants)"]
    if token and on:
        raise DebugSwitchRefused(
            f"{', '.join(on)} is set: huggingface_hub would log every request with its headers and body, where "
            "the Hugging Face token travels. Unset it to run with a token; debug a request with a token you revoke "
            "afterwards, outside this engine."
        )


def make_api(token: str | None, endpoint: str | None = None):  # -> HfApi (imported lazily: it reads env at import)
    import huggingface_hub.constants as hub_constants
    from huggingface_hub import HfApi

    refuse_request_dumps(token)

    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    if not uses_xet(endpoint):
        hub_constants.HF_HUB_DISABLE_XET = True
    return HfApi(endpoint=endpoint, token=token)
