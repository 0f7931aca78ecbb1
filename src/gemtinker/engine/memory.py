"""Keeping the process's resident memory close to what it uses (glibc).

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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def release_free_memory() -> None:
    """Give freed heap pages back to the OS where the C library can (glibc); else nothing."""
    trim = _libc_trim()
    if trim is not None:
        trim(0)


_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's malloc.h
_M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 4 << 20


@functools.cache
def configure_allocator() -> bool:
    """Apply the allocator settings above once per process; False where libc is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None or _libc_trim() is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_ARENA_MAX, 2))
