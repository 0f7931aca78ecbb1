"""Cross-request prefix KV cache for the sampler.

An entry holds the keys/values of one token sequence (a prompt, or a prompt plus the completion
sampled for it) computed under one sampler's weights. A later prompt that starts with (part of)
that sequence - the next turn of a multi-turn conversation, another sample of the same prompt -
copies those K/V instead of recomputing them.

Entries are keyed by the sampler key (the sampler id; `save_weights_for_sampler` makes a new id),
so K/V computed under other weights are never reused. Memory is bounded by a token budget with
LRU eviction; an entry that is a prefix of a newer entry of the same sampler is dropped at once,
since the newer one serves every lookup the older one could.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class CacheEntry:
    key: str
    tokens: np.ndarray  # (L,) int64
    kv: torch.Tensor  # (layers, 2, kv_heads, L, head_dim), on the engine's device


class PrefixCache:
    def __init__(self, max_tokens: int):
        self.max_tokens = int(max_tokens)
        self._entries: OrderedDict[int, CacheEntry] = OrderedDict()  # LRU order: oldest first
        self._by_key: dict[str, set[int]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # drop_key comes from other threads
        self.tokens = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str, prompt: list[int]) -> tuple[CacheEntry | None, int]:
        """Longest cached prefix of `prompt` for `key`: (entry, number of tokens it covers)."""
        p = np.asarray(prompt, dtype=np.int64)
        best, best_n, best_id = None, 0, None
        with self._lock:
            for eid in self._by_key.get(key, ()):
                e = self._entries[eid]
                m = min(len(e.tokens), len(p))
                diff = np.flatnonzero(e.tokens[:m] != p[:m])
                n = int(diff[0]) if diff.size else m
                if n > best_n:
                    best, best_n, best_id = e, n, eid
            if best_id is not None:
                self._entries.move_to_end(best_id)
        return best, best_n

    def insert(self, key: str, tokens: list[int], kv: torch.Tensor) -> None:
        """Store K/V for `tokens` (kv must be a tensor the caller no longer writes to)."""
        t = np.asarray(tokens, dtype=np.int64)
        if len(t) == 0 or len(t) > self.max_tokens:
            return
        with self._lock:
            for eid in list(self._by_key.get(key, ())):
                e = self._entries[eid]
                if len(e.tokens) >= len(t) and np.array_equal(e.tokens[: len(t)], t):
                    self._entries.move_to_end(eid)  # already covered by a longer entry
                    return
                if len(e.tokens) < len(t) and np.array_equal(t[: len(e.tokens)], e.tokens):
                    self._remove(eid)  # the new entry subsumes it
            eid = next(self._ids)
            self._entries[eid] = CacheEntry(key, t, kv)
            self._by_key.setdefault(key, set()).add(eid)
            self.tokens += len(t)
            while self.tokens > self.max_tokens:
                self._remove(next(iter(self._entries)))
                self.evictions += 1

    def drop_key(self, key: str) -> None:
        """Forget every entry of a released sampler."""
        with self._lock:
            for eid in list(self._by_key.get(key, ())):
                self._remove(eid)

    def clear(self) -> None:
        with self._lock:
            for eid in list(self._entries):
                self._remove(eid)

    def _remove(self, eid: int) -> None:
        e = self._entries.pop(eid)
        ids = self._by_key[e.key]
        ids.discard(eid)
        if not ids:
            del self._by_key[e.key]
        self.tokens -= len(e.tokens)
