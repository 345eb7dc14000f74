"""Whether a Hugging Face hub id can be loaded now: one line, in seconds, instead of minutes of retries.

Without network, the hub client retries every request with back-off (five retries per file, ~50 s and
~70 lines of warnings for one tokenizer) before transformers gives up. qvl asks once, before the first
hub request: in offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``) the client reads only its
cache and fails fast by itself; otherwise one TCP connection to the hub endpoint, with a short timeout,
tells whether the hub can be reached at all.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from qvl_data.errors import QvlError

__all__ = ["hub_endpoint", "offline_mode", "require_hub"]

DEFAULT_ENDPOINT = "https://huggingface.co"
CONNECT_TIMEOUT_SECONDS = 5.0
_TRUE = {"1", "on", "yes", "true"}
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def offline_mode() -> bool:
    """Whether the user asked the hub client for its cache only (the variables transformers reads)."""
    return any(
        os.environ.get(name, "").strip().lower() in _TRUE
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_endpoint() -> str:
    """The hub's address, as the hub client reads it (``HF_ENDPOINT``)."""
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or DEFAULT_ENDPOINT


@functools.lru_cache(maxsize=8)
def _connect_error(endpoint: str) -> str:
    """Why a TCP connection to ``endpoint`` fails ('' when it succeeds); asked once per process."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    port = parts.port or (80 if parts.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS):
            return ""
    except OSError as e:
        return str(e.strerror or e) or type(e).__name__


def _in_hub_cache(model_id: str) -> bool:
    """Whether the Hugging Face cache holds a snapshot of ``model_id`` (a directory check, no request)."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{model_id.replace('/', '--')}" / "snapshots"
    try:
        return any(snapshots.iterdir())
    except OSError:
        return False


def require_hub(model_id: str, what: str = "--model") -> None:
    """A one-line QvlError when ``model_id`` (a hub id) would have to be fetched from a hub that cannot be
    reached. When the hub cannot be reached but the Hugging Face cache holds the model, the hub client is
    switched to offline mode for this process (what it would fall back to after its retries). Offline
    mode and a configured proxy pass unchecked (the client then knows better)."""
    if offline_mode() or any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return
    endpoint = hub_endpoint()
    error = _connect_error(endpoint)
    if error and _in_hub_cache(model_id):
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True  # read by every later hub call (huggingface_hub.is_offline_mode)
        return
    if error:
        raise QvlError(
            f"{what} {model_id}: a hub id, but the hub {endpoint} cannot be reached ({error}); pass a local "
            "checkpoint directory, or set HF_HUB_OFFLINE=1 to load it from the Hugging Face cache"
        )
