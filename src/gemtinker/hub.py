"""Hugging Face hub reachability.

With no network, huggingface_hub retries every file lookup with back-off (minutes per tokenizer
load) before falling back to the cache. Entry points call `use_offline_hub_if_unreachable()` so a
machine without internet goes straight to the local cache, and one with internet is left alone.
"""

from __future__ import annotations

import os
import socket
import sys

HUB_HOST = "huggingface.co"


def hub_reachable(timeout_s: float = 2.0) -> bool:
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def use_offline_hub_if_unreachable() -> bool:
    """Switch huggingface_hub to offline mode when the hub cannot be reached. Returns offline-ness."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        offline = True
    else:
        offline = not hub_reachable()
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        # The flag is read once at import; patch it when huggingface_hub is already loaded.
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None:
            constants.HF_HUB_OFFLINE = True
    return offline
