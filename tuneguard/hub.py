"""The Hugging Face Hub, asked for only when a recipe or task names something on it.

Without a network huggingface_hub retries each request for about half a minute, printing a warning per try,
before the one-line error tuneguard gives. One quick connection to the endpoint (or to the HTTPS proxy) decides
instead: where it fails, the process goes to the Hub's offline mode, so files already in the local cache still
load and anything else fails at once.
"""

from __future__ import annotations

import functools
import socket
import sys
import urllib.request
from urllib.parse import urlparse

from huggingface_hub import constants

from tuneguard.progress import say

CONNECT_SECONDS = 3.0


@functools.cache
def reachable() -> bool:
    """Whether the Hub's endpoint, or the proxy in front of it (``HTTPS_PROXY``, else ``ALL_PROXY``, unless
    ``NO_PROXY`` names the endpoint), takes a TCP connection within a few seconds."""
    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT).hostname or ""
    proxies = urllib.request.getproxies()
    proxy = None if urllib.request.proxy_bypass(endpoint) else proxies.get("https") or proxies.get("all")
    url = proxy or constants.ENDPOINT
    parsed = urlparse(url if "//" in url else f"//{url}")
    if parsed.hostname is None:
        return True  # an endpoint tuneguard cannot read: leave it to huggingface_hub
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        socket.create_connection((parsed.hostname, port), timeout=CONNECT_SECONDS).close()
    except OSError:
        return False
    return True


def use_hub() -> None:
    """Call before the first read from the Hub: offline mode, said once, where it cannot be reached."""
    if constants.HF_HUB_OFFLINE or reachable():
        return
    constants.HF_HUB_OFFLINE = True
    loaded = sys.modules.get("datasets.config")  # datasets copies the setting when imported, so only if it was
    if loaded is not None:
        loaded.HF_HUB_OFFLINE = True
    say(f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached from here: only files already in "
        "the local cache are used")
