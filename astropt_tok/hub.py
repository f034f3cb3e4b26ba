"""A quick look at whether the Hugging Face hub can be reached, before the libraries spend half a minute retrying.

`HF_HUB_OFFLINE` (and the libraries' use of the HF cache) is honoured: offline, nothing is checked. Behind an
HTTP(S) proxy nothing is checked either (a direct connection says nothing about the proxy's).
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = 3.0


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks for the cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_unreachable_reason(timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when the hub's host accepts a connection within `timeout` seconds (or offline, or a proxy); else why not."""
    if hub_offline() or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or type(exc).__name__}"
    return None
