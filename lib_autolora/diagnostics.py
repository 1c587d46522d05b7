"""Diagnostics for the soak test and the benchmark, loaded only when AUTOLORA_DIAGNOSTICS=1: the
routes GET /autolora/v1/residue (what the process holds and what is registered in the host) and
POST /autolora/v1/reset-peak (torch's peak-memory counter), and the garbage-collector clock that
fills the stats' gc_ms / gc_full_collections. Without the variable nothing here runs: no route, no
gc callback. Imports nothing from a WebUI; the host's objects come in as arguments.

What this process holds in memory, for the leak checks:

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

import gc
import os
import time
from typing import Callable, Iterable, Optional

import torch

from .memory import return_free_heap

ENV = "AUTOLORA_DIAGNOSTICS"


def enabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def resident_bytes() -> Optional[int]:
    """Resident memory of this process (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_free_heap() -> bool:
    """Garbage-collects, then returns free heap memory to the OS where glibc can (True if it ran)."""
    gc.collect()
    return return_free_heap()


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


class GcClock:
    """Time the Python garbage collector has run in this process, and its full collections
    (gc.callbacks; installed once, never removed, so nothing is left behind by an interrupted
    generation). A full collection in a WebUI's heap takes a noticeable share of a second; the
    stats say how much of a generation went there, which per-step timings alone cannot."""

    def __init__(self):
        self.seconds = 0.0
        self.full = 0
        self._t0 = None

    def install(self) -> "GcClock":
        if self not in gc.callbacks:
            gc.callbacks.append(self)
        return self

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None
            if info.get("generation") == 2:
                self.full += 1

    def reading(self) -> tuple:
        return self.seconds, self.full


def loaded_modules(sd_model) -> list:
    """The torch modules of the loaded checkpoint: A1111's model itself, or the Forge family's UNet
    and text encoder behind its patchers."""
    roots = [sd_model] if isinstance(sd_model, torch.nn.Module) else []
    objects = getattr(sd_model, "forge_objects", None)
    if objects is not None:
        roots += [getattr(getattr(objects, "unet", None), "model", None),
                  getattr(getattr(objects, "clip", None), "cond_stage_model", None)]
    return [r for r in roots if isinstance(r, torch.nn.Module)]


def host_residue(callback_map: dict, sd_model, open_runs: int) -> dict:
    """`residue_counts` of what is loaded, plus the sampler hooks on the Forge family's UNet patcher."""
    options = getattr(getattr(getattr(sd_model, "forge_objects", None), "unet", None), "model_options", None) or {}
    return residue_counts(callback_map, loaded_modules(sd_model), {
        "open_runs": open_runs, "unet_pre_cfg_functions": len(options.get("sampler_pre_cfg_function", []))})


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def routes(residue: Callable[[], dict]) -> list:
    """(path, endpoint, method) of the diagnostic routes, for hosts.http.install."""
    def reset_peak_route():
        reset_peak()
        return {"ok": True}

    return [("/autolora/v1/residue", residue, "GET"), ("/autolora/v1/reset-peak", reset_peak_route, "POST")]
