"""Helpers shared by the rebn trainer tests (`support.rebn`; holds no tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gemtinker.recipes.rebn import loop
from gemtinker.recipes.runs.files import read_jsonl


def interrupt_at_step(monkeypatch: pytest.MonkeyPatch, log_dir: Path, step: int) -> Any:
    """Make the trainer raise KeyboardInterrupt (as Ctrl-C would) while building batch `step`.

    Returns the real `build_batch`, for the test to put back before resuming.
    """
    real_build = loop.build_batch

    def crash(episodes: Any, cfg: Any, rng: Any) -> Any:
        if any(ep.seed for ep in episodes) and len(read_jsonl(log_dir / "metrics.jsonl")) == step:
            raise KeyboardInterrupt
        return real_build(episodes, cfg, rng)

    monkeypatch.setattr(loop, "build_batch", crash)
    return real_build
