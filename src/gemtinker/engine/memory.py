"""Keeping the process's resident memory close to what it uses (glibc, Linux).

A training call allocates and frees about a gigabyte of activations in blocks of a few MB, and
the sampler keeps long-lived blocks of the same sizes (packed weights, cached K/V). glibc keeps
freed blocks below its self-raising mmap threshold (up to 32 MB) in its heaps, between live
ones, so resident memory keeps every call's high-water mark plus fragmentation: during a
10-step `make run` the heaps held 1.3 GB free beside 2.8 GB in use.

What is done, process-wide, when an engine starts (`configure_allocator`): blocks of 4 MB and
more are mmapped (so freeing returns them at once) and threads share at most two heaps; and
after each training call `release_free_memory` hands free heap pages back. Measured on that
run: peak RSS 5.7 -> 5.2 GB, step times unchanged. Rejected: a 256 kB mmap threshold made
training 2.2x slower (every activation freshly faulted and zeroed).

`MappedWeights` hands back the pages of frozen weights that are views of the model's file while
only copies of them are read (the sampler's packed linears, a bf16 learner's copies).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os

import numpy as np
import torch


@functools.cache
def _libc():
    """The C library (errno kept for error messages), or None where it cannot be found."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


@functools.cache
def _libc_function(name: str, argtypes: tuple):
    """A function of the C library with its argument types set, or None (glibc-only ones are
    missing from musl and macOS)."""
    fn = getattr(_libc(), name, None)
    if fn is not None:
        fn.argtypes = list(argtypes)
        fn.restype = ctypes.c_int
    return fn


def _libc_trim():
    return _libc_function("malloc_trim", (ctypes.c_size_t,))


def release_free_memory() -> None:
    """Give freed heap pages back to the OS where the C library can (glibc); else nothing."""
    trim = _libc_trim()
    if trim is not None:
        trim(0)


_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's malloc.h
_M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 4 << 20


# oneDNN (and its C++ wrapper ideep, inside torch) keep every primitive they made, up to 1024 each,
# keyed by shape; a packed learner's bf16 matmuls see a new row count on almost every call, so
# the caches grew by about 10 MB a training call (0.30 GB over 30 calls on subsets of bench batch
# a). At 128 each they grew 0.10 GB and stopped; at 16, 0.05 GB, but bench batch c (many branch
# rows) then trained 7-9% slower than with the defaults, at 128 as fast (docs/learner-2026-12-03.md).
# Read when the first primitive is made: set here, before an engine runs anything; a value the
# user set is kept.
ONEDNN_CACHE_CAPACITY = "128"


@functools.cache
def configure_allocator() -> bool:
    """Apply the allocator settings above once per process; False where libc is not glibc."""
    for var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(var, ONEDNN_CACHE_CAPACITY)
    mallopt = _libc_function("mallopt", (ctypes.c_int, ctypes.c_int))
    if mallopt is None or _libc_trim() is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_ARENA_MAX, 2))


# --------------------------------------------------------------------------- mapped weights
_MADV_DONTNEED = 4  # from linux/mman.h


def _private_file_mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's private mappings of regular files (Linux)."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[1][3] == "p" and parts[5].startswith("/"):
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    out.append((start, end, parts[5].rstrip("\n")))
    except OSError:
        return []
    return out


def _written_bytes(starts: set[int]) -> int:
    """Pages written into the private file mappings that begin at `starts`: a write gives the
    process its own (anonymous) copy of the page. (Not Private_Dirty, which also counts the
    page cache's pages of a file written recently and not yet flushed.)"""
    total, current = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's header line
                current = int(head.split("-")[0], 16) in starts
            elif current and head == "Anonymous:":
                total += int(line.split()[1]) * 1024
    return total


class MappedWeights:
    """Frozen tensors that are views of a file mapping, whose memory can be handed back while
    nothing reads them.

    transformers maps a model's safetensors file (privately) and keeps the weights as views of
    it, so they are the file's clean pages: `drop` unmaps them from the process (madvise
    DONTNEED) and the next read faults them back from the page cache, unchanged and without a
    disk read while the cache holds the file. The sampler reads only its own packed copies of the
    linears, and a bf16 learner only its bf16 copies: on `make run` the fp32 originals were
    0.54 GB of every evaluation's peak. Nothing is dropped if a page of the file's mappings was
    written (a dropped written page would come back as the file's contents), on CUDA, or where
    /proc is not Linux's."""

    def __init__(self, tensors: list[torch.Tensor]):
        page = mmap.PAGESIZE
        maps = _private_file_mappings()
        ranges: list[tuple[int, int]] = []
        self._map_starts: set[int] = set()
        for t in tensors:
            if t.device.type != "cpu" or t.numel() == 0:
                continue
            lo = t.untyped_storage().data_ptr()
            hi = lo + t.untyped_storage().nbytes()
            home = next((m for m in maps if m[0] <= lo and hi <= m[1]), None)
            if home is None:
                continue
            a, b = -(-lo // page) * page, hi // page * page  # whole pages only: neighbours may be read
            if a < b:
                ranges.append((a, b))
                self._map_starts.add(home[0])
        ranges.sort()
        merged: list[tuple[int, int]] = []
        for a, b in ranges:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.ranges = merged
        self.nbytes = sum(b - a for a, b in merged)
        self.refused: str | None = None  # why the last drop did nothing, if it did nothing

    def drop(self) -> int:
        """Unmap the pages (see the class); returns the bytes advised."""
        madvise = _libc_function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))
        if not self.ranges or madvise is None:
            return 0
        written = _written_bytes(self._map_starts)
        if written:
            self.refused = f"{written} bytes of the mapped weights were written; keeping them"
            return 0
        self.refused = None
        for a, b in self.ranges:
            if madvise(a, b - a, _MADV_DONTNEED) != 0:
                self.refused = f"madvise failed (errno {ctypes.get_errno()})"
                return 0
        return self.nbytes

    def resident_bytes(self) -> int:
        """How much of the droppable pages this process has mapped in now (/proc/self/pagemap)."""
        page = mmap.PAGESIZE
        present = 0
        with open("/proc/self/pagemap", "rb") as f:
            for a, b in self.ranges:
                f.seek(a // page * 8)
                entries = np.frombuffer(f.read((b - a) // page * 8), dtype=np.uint64)
                present += int(np.count_nonzero(entries >> np.uint64(63)))
        return present * page
