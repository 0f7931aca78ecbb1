"""The policy's tokenizer, for the recipes that render prompts themselves (trainer, evaluation)."""

from __future__ import annotations

from typing import Any


def load_tokenizer(model_name: str, client: Any = None) -> Any:
    """The model's tokenizer: by name (local folder or HF cache), else from the Tinker service."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_name)
    except Exception as first:  # noqa: BLE001 - fall back to the server's tokenizer id
        if client is None:
            raise
        try:
            return client.get_tokenizer()
        except Exception:  # noqa: BLE001
            raise first from None
