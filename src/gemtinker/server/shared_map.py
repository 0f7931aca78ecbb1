"""A dict shared between threads: every access holds one lock, and iteration walks a snapshot.

`Service._live` is written from training threads (a model is registered when its create op
finishes there) and iterated on the event loop (reaping idle sessions, finishing one). A plain
dict iterated while another thread adds a key raises "dictionary changed size during
iteration"; here `keys()`, `values()`, `items()` and `iter()` return lists copied under the lock,
so any loop over them, including ones added later, is safe.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Generic, TypeVar, overload

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")


class SharedMap(Generic[K, V]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[K, V] = {}

    def __setitem__(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value

    def __getitem__(self, key: K) -> V:
        with self._lock:
            return self._items[key]

    @overload
    def get(self, key: K) -> V | None: ...
    @overload
    def get(self, key: K, default: D) -> V | D: ...

    def get(self, key, default=None):
        with self._lock:
            return self._items.get(key, default)

    @overload
    def pop(self, key: K) -> V: ...
    @overload
    def pop(self, key: K, default: D) -> V | D: ...

    def pop(self, key, *default):
        with self._lock:
            return self._items.pop(key, *default)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def keys(self) -> list[K]:
        with self._lock:
            return list(self._items)

    def values(self) -> list[V]:
        with self._lock:
            return list(self._items.values())

    def items(self) -> list[tuple[K, V]]:
        with self._lock:
            return list(self._items.items())

    def __iter__(self) -> Iterator[K]:
        return iter(self.keys())
