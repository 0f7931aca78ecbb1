"""The fast path's KV buffer and the rows decoding in it.

Buffer layout (see `fast_decoder`): (layers, 2, rows, kv_heads, T, head_dim). Row i of the
buffer belongs to `rows[i]`, from position 0 (no left padding). Between steps the rows are
dense: `compact` moves the last live rows into the holes retirement left, so a decode step runs
over buffer rows 0..n-1 without an index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..types import StopReason
from .ops import StopRule
from .request import SampleRequest


@dataclass
class DecodeRow:
    """One sample of a request, decoding in one buffer row."""

    req: SampleRequest
    sample: int  # which of the request's num_samples
    stop: StopRule
    length: int  # K/V positions written for this row
    next_token: int = -1
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk: list[list[tuple[int, float]]] = field(default_factory=list)  # only when extras.topk_sample
    stop_reason: StopReason = "length"
    finished: bool = False


# Makes a zeroed buffer of (rows, positions): `FastDecoder.new_buffer`.
NewBuffer = Callable[[int, int], torch.Tensor]


class KVRows:
    """The buffer (grown on demand, kept between steps) and its rows (None: a hole)."""

    def __init__(self, max_rows: int, max_len: int | None):
        self.max_rows = max_rows  # rows a batch may use; the buffer starts with min(this, 8)
        self.max_len = max_len  # the model's context length: positions never grow past it
        self.buf: torch.Tensor | None = None
        self.rows: list[DecodeRow | None] = []

    def ensure_capacity(self, new_buffer: NewBuffer, rows: int, t: int) -> None:
        """Room for `rows` rows of `t` positions; the live rows' K/V move into a grown buffer."""
        buf = self.buf
        if buf is not None and buf.shape[2] >= rows and buf.shape[4] >= t:
            return
        old_rows, old_t = (0, 0) if buf is None else (buf.shape[2], buf.shape[4])
        new_rows = max(rows, old_rows, min(self.max_rows, 8))
        new_t = max(old_t, -(-(t + 128) // 256) * 256)  # headroom so decode rarely regrows
        if self.max_len:
            new_t = min(new_t, max(t, self.max_len))
        new = new_buffer(new_rows, new_t)
        n = len(self.rows)
        if buf is not None and n:
            new[:, :, :n, :, :old_t] = buf[:, :, :n]
        self.buf = new

    def load(self, row: int, kv: torch.Tensor, n: int) -> None:
        """Copy the first `n` positions of a cached sequence's K/V (layers, 2, kv_heads, L, hd)."""
        self.buf[:, :, row, :, :n] = kv[:, :, :, :n]

    def copy(self, dst: int, src: int, n: int) -> None:
        """Row `dst` gets the first `n` positions of row `src`."""
        self.buf[:, :, dst, :, :n] = self.buf[:, :, src, :, :n]

    def snapshot(self, row: int, n: int) -> torch.Tensor:
        """A copy of a row's first `n` positions (for the prefix cache)."""
        return self.buf[:, :, row, :, :n].clone()

    def compact(self) -> None:
        """Move the last live rows into the holes, so rows 0..n-1 are all live."""
        rows = self.rows
        n_live = sum(r is not None for r in rows)
        holes = [i for i in range(n_live) if rows[i] is None]
        movers = [i for i in range(n_live, len(rows)) if rows[i] is not None]
        for d, s in zip(holes, movers):
            self.copy(d, s, rows[s].length)
            rows[d] = rows[s]
        del rows[n_live:]
