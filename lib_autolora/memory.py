"""Memory: the device readings the stats and the strategy choice use (CUDA only; None where
unknown), and returning freed heap memory to the OS (glibc's malloc_trim). A generation with dense
deltas allocates and frees gigabytes on the CPU; glibc keeps freed memory in its arenas for reuse,
so a process's resident memory grows by that much per generation until the machine runs out, while
nothing is held."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's malloc_trim, looked up once; None elsewhere (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return getattr(libc, "malloc_trim", None)
    except OSError:
        return None


def return_free_heap() -> bool:
    """Hands free heap pages back to the OS where glibc can (True if it ran). No garbage collection:
    what the generation freed is free already, and a full collection of a WebUI's heap is slow."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def peak_bytes() -> Optional[int]:
    if torch.cuda.is_available():
        try:
            return int(torch.cuda.max_memory_allocated())
        except RuntimeError:
            return None
    return None


def free_bytes() -> Optional[int]:
    if torch.cuda.is_available():
        try:
            return int(torch.cuda.mem_get_info()[0])
        except RuntimeError:
            return None
    return None
