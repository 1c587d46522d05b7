"""What this process holds in memory, for the leak checks of the soak test (/autolora/v1/residue).

Resident memory (RSS) alone cannot tell a leak from the allocator: glibc keeps freed heap memory
for reuse instead of returning it to the OS, so re-patching a model's weights (a LoRA set change)
can raise RSS by a model's size for good while nothing is held. Measured on Forge: the same
deterministic soak stepped by 1.2 GB at call 41 in one run and at call ~100 in another, flat
otherwise. So three readings:
- `resident_bytes()`: RSS as the OS counts it;
- `trimmed_resident_bytes()`: RSS after a garbage collection and glibc's `malloc_trim(0)`, which
  hands free heap pages back to the OS (what is left is held, or fragmented around what is held);
- `live_tensor_bytes()`: the bytes of every distinct CPU tensor storage that a Python object
  references, which a leak of tensors (factors, conditionings, a processing object) raises
  whatever the allocator does.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
from typing import Optional

import torch


def resident_bytes() -> Optional[int]:
    """Resident memory of this process (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's malloc_trim, looked up once; None elsewhere (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return getattr(libc, "malloc_trim", None)
    except OSError:
        return None


def release_free_heap() -> bool:
    """Garbage-collects, then returns free heap memory to the OS where glibc can (True if it ran)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def trimmed_resident_bytes() -> Optional[int]:
    """RSS after `release_free_heap()`; None where RSS cannot be read or nothing could be trimmed."""
    return resident_bytes() if release_free_heap() else None


def live_tensor_bytes() -> tuple[int, int]:
    """(bytes, count) of the distinct CPU tensor storages referenced by Python objects; a view and
    its base count once."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            # type(), not isinstance(): isinstance asks proxies (deprecation shims) for __class__
            if not issubclass(type(obj), torch.Tensor) or obj.device.type != "cpu":
                continue
            storage = obj.untyped_storage()
            key = storage.data_ptr()
            if key in seen or key == 0:
                continue
            seen.add(key)
            total += storage.nbytes()
        except Exception:  # noqa: BLE001 - exotic tensor subclasses (meta, sparse, fake) are not counted
            continue
    return total, len(seen)
