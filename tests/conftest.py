"""Shared test set-up.

Tests never touch the network: the hub is put in offline mode before anything imports
huggingface_hub, and built models are cached under GEMTINKER_CACHE (default ~/.cache/gemtinker)
so the GGUF conversion runs once per machine.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("WANDB_MODE", "offline")
