"""The LoRAs on a Forge-family ModelPatcher, read through the patcher's own conventions.

Two layouts exist, told apart by what a patcher holds, never by the WebUI's name:

- **keyed by file** (Forge main, Forge Neo until early 2026): `patcher.lora_patches =
  {(filename, strength_patch, strength_model, online): {key: [entries]}}`, the originals of merged
  weights in `patcher.model.lora_loader.backup[key]`;
- **ComfyUI's** (Forge Neo 2.x and reForge, ports of ComfyUI's ModelPatcher; Forge Classic an
  older one): `patcher.patches = {key: [entries]}` without the file a patch came from, the
  originals in `patcher.backup[key]` (a (weight, inplace_update) tuple, or the tensor; filled when
  a weight is merged, emptied when the model is unpatched). Each LoRA is added on a fresh clone
  (`load_lora_for_models`: `clone()` + `add_patches`); where a clone records its `parent` (not
  Forge Classic), the links of the parent chain that added entries are the LoRAs, in the order
  they were loaded, and the clones share one backup. Since Forge Neo 2.29 an online LoRA is not
  among `patches` but one weight wrapper per key and LoRA (`weight_wrapper_patches[key]`, each an
  `OnlineLoRAPatch` that names its file and holds its one entry), applied in each forward.

An entry is (strength_patch, v, strength_model, offset, function[, online]) where `v` is a
("lora", (...)) tuple or a ComfyUI weight adapter. Nothing here merges: factors.py does, always on
a copy, because ComfyUI's merge edits the weight it is given in place.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

UNKNOWN_FILE = None  # the "filename" of patches whose LoRA file cannot be told

UNTOLD_NOTICE = ("AutoLoRA: this WebUI does not record which LoRA a patch comes from, so AutoLoRA can guide only "
                 "every LoRA in the prompt (leave 'Guided LoRAs' empty); generated without AutoLoRA")

MAX_CHAIN = 256  # clones between the checkpoint's patcher and the one sampled with; more = a loop


def _added_links(patcher) -> list:
    """The entries each clone of the parent chain added, oldest first: [{key: [entries]}]. The
    chain's root (the checkpoint's own patcher) adds nothing that is a LoRA."""
    links, child = [], patcher
    for _ in range(MAX_CHAIN):
        parent = getattr(child, "parent", None)
        if parent is None:
            break
        before = getattr(parent, "patches", None) or {}
        added = {key: list(entries[len(before.get(key, ())):]) for key, entries in child.patches.items()
                 if len(entries) > len(before.get(key, ()))}
        if added:
            links.append(added)
        child = parent
    return links[::-1]


def _identity(filename, patches: dict) -> tuple:
    first = next(iter(patches.values()))[0]
    online = bool(first[5]) if len(first) > 5 else False
    return (filename, first[0], first[2], online)


def patch_sets(patcher, loaded_files: tuple = ()) -> dict:
    """The patcher's LoRA patches per LoRA file, {(filename, strength_patch, strength_model,
    online): {key: [entries]}}, in the order the host applies them: merged ones, then online ones.
    With ComfyUI's layout the files of merged patches come from the parent chain when it has one
    link per LoRA of `loaded_files` (in the order the host loaded them); otherwise every merged
    LoRA patch is filed under UNKNOWN_FILE."""
    keyed = getattr(patcher, "lora_patches", None)
    if keyed:
        return keyed
    return {**_merged_sets(patcher, loaded_files), **_online_sets(patcher)}


def _online_sets(patcher) -> dict:
    """Forge Neo 2.29's online LoRAs, read from their weight wrappers (which name their file);
    wrappers of other kinds (not one entry and a name) are not LoRAs."""
    sets: dict = {}
    for key, wrappers in (getattr(patcher, "weight_wrapper_patches", None) or {}).items():
        for wrapper in wrappers:
            entries = getattr(wrapper, "patch", None)
            if not hasattr(wrapper, "name") or not isinstance(entries, list) or len(entries) != 1:
                continue
            entry = tuple(entries[0])
            sets.setdefault((wrapper.name, entry[0], entry[2], True), {}).setdefault(key, []).append(entry)
    return sets


def _merged_sets(patcher, loaded_files: tuple) -> dict:
    patches = getattr(patcher, "patches", None) or {}
    if not patches:
        return {}
    links = _added_links(patcher)
    if links and len(links) == len(loaded_files):
        sets: dict = {}
        for filename, link in zip(loaded_files, links):  # a LoRA named twice is patched twice: keep both
            merged = sets.setdefault(_identity(filename, link), {})
            for key, entries in link.items():
                merged.setdefault(key, []).extend(entries)
        return sets
    if links:
        merged: dict = {}
        for link in links:
            for key, entries in link.items():
                merged.setdefault(key, []).extend(entries)
        return {(UNKNOWN_FILE, 1.0, 1.0, False): merged}
    return {(UNKNOWN_FILE, 1.0, 1.0, False): patches}


def guided_sources(sets: dict, guided_files: set, loaded_files: set) -> Optional[set]:
    """The patch-set filenames to guide: `guided_files`, or, where the files cannot be told apart,
    every LoRA patch when every LoRA of the prompt is guided; None when the guided LoRAs' patches
    cannot be told apart from the others'."""
    if UNKNOWN_FILE not in {identity[0] for identity in sets}:
        return set(guided_files)
    return set(guided_files) | {UNKNOWN_FILE} if set(guided_files) >= set(loaded_files) else None


def originals(patcher) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """`original(key, current)`: the weight of `key` before any LoRA was merged into it. A weight
    that is not in a backup is unmerged (never merged, or its patches are applied per call)."""
    comfy_backup = getattr(patcher, "backup", None)
    loader_backup = getattr(getattr(getattr(patcher, "model", None), "lora_loader", None), "backup", None)

    def original(key: str, current: torch.Tensor) -> torch.Tensor:
        if isinstance(comfy_backup, dict) and key in comfy_backup:
            saved = comfy_backup[key]
            return getattr(saved, "weight", saved)  # a (weight, inplace_update) tuple; a tensor in older ports
        if isinstance(loader_backup, dict) and key in loader_backup:
            return loader_backup[key]
        return current

    return original


def applied_per_call(module) -> bool:
    """The host applies patches to this layer's weight in each forward (online LoRAs, or low-VRAM
    layers), so the stored weight is not the merged one."""
    return bool(getattr(module, "forge_online_loras", None)) or bool(getattr(module, "weight_function", None))


def clones_share_weights(patcher) -> bool:
    """Whether a clone of `patcher` samples with the weights the host merged for it: Forge main's
    clones share its lora_loader, ComfyUI's a backup and a patch version (`patches_uuid`). Forge
    Classic's clones are new models to its memory manager, which unpatches and merges every LoRA
    again for one: there the binding hooks the host's own patcher and takes its function off after."""
    if isinstance(getattr(patcher, "lora_patches", None), dict):
        return True
    return hasattr(patcher, "patches_uuid") or getattr(patcher, "parent", None) is not None


def missing_convention(patcher_cls) -> Optional[str]:
    """Why patchers of `patcher_cls` do not keep LoRAs in a layout read here, or None. Built on a
    one-layer model, as the host builds its own (model, load device, offload device)."""
    cpu = torch.device("cpu")
    try:
        patcher = patcher_cls(torch.nn.Linear(2, 2), cpu, cpu)
        clone = patcher.clone()
    except Exception as exc:  # noqa: BLE001 - any failure means the convention moved
        return f"its ModelPatcher cannot be built as (model, load device, offload device) ({type(exc).__name__}: {exc})"
    if isinstance(getattr(patcher, "lora_patches", None), dict):
        if not isinstance(getattr(getattr(patcher.model, "lora_loader", None), "backup", None), dict):
            return "its ModelPatcher keeps lora_patches without a lora_loader backup of the original weights"
        return None
    if not isinstance(getattr(patcher, "patches", None), dict) or not isinstance(getattr(patcher, "backup", None), dict):
        return "its ModelPatcher keeps neither lora_patches nor ComfyUI's patches and backup"
    if not isinstance(getattr(clone, "patches", None), dict):
        return "its ModelPatcher clones carry no patches"
    return None
