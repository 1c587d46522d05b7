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
from typing import Iterable, Optional

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


def residue_counts(callback_map: dict, module_roots: Iterable, extra: Optional[dict] = None) -> dict:
    """What is registered in the host now: callbacks per list of the host's `script_callbacks`
    (ours counted apart, by the `autolora` name or script path), forward (pre-)hooks on every module
    of the model, and the adapter's own open state. Between generations, a clean extension leaves
    these exactly as they were before its first generation."""
    callbacks, ours = {}, 0
    for name, entries in callback_map.items():
        callbacks[name] = len(entries)
        for entry in entries:
            tag = f"{getattr(entry, 'name', '') or ''} {getattr(entry, 'script', '') or ''}".lower()
            ours += "autolora" in tag
    hooks, modules = 0, 0
    seen = set()
    for root in module_roots:
        for module in getattr(root, "modules", lambda: [])():
            if id(module) in seen:
                continue
            seen.add(id(module))
            modules += 1
            hooks += len(module._forward_hooks) + len(module._forward_pre_hooks)
    # Raw RSS first, as the host left it; the trimmed reading collects garbage, so the tensors
    # counted after it are the ones still referenced, not cycles waiting for the collector.
    resident = resident_bytes()
    trimmed = trimmed_resident_bytes()
    tensor_bytes, tensors = live_tensor_bytes()
    return {"callbacks_total": sum(callbacks.values()), "callbacks_autolora": ours, "callbacks": callbacks,
            "module_hooks": hooks, "modules": modules, "resident_bytes": resident,
            "resident_bytes_trimmed": trimmed, "tensor_bytes": tensor_bytes, "tensor_storages": tensors,
            **(extra or {})}
