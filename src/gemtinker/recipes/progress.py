"""Console progress bars for sampling, training and evaluation (tqdm on stderr, optional)."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def advance(bar: Any, n: int) -> None:
    # Episodes already running when the batch fills are finished, so the count can pass the
    # target; grow the bar instead of letting tqdm drop its percentage display.
    if bar.total is not None and bar.n + n > bar.total:
        bar.total = bar.n + n
    bar.update(n)
