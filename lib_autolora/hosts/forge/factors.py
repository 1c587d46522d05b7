"""LoRA factors read from the Forge family's own patches (grouped per LoRA file by patcher.py).

Each patch entry is (strength_patch, v, strength_model, offset, function[, online]) on a parameter
key ("diffusion_model.….weight"), with `v = ("lora", (up, down, alpha, mid, dora_scale))` or a
ComfyUI weight adapter holding the same factors (the host's `merge_lora_to_weight` applies them in
that order). Merged ("offline") LoRAs change the weights, the originals kept in a backup; online
ones are applied in each forward. Either way the module output holds the LoRA term, so the base
branch subtracts the guided part with `DeltaHooks`: nothing is merged again and no weight is
loaded twice.

Per patched parameter, the guided LoRAs' contribution is
- low-rank terms (LoRA / LoCon / Tucker mid; a fused-QKV `offset` slice pads its up or down factor
  with zeros) when every patch on that parameter is additive, so merged = W + Σ terms exactly;
- otherwise one exact dense delta, `merge(all patches) - merge(unguided patches)`, computed by
  Forge's own `merge_lora_to_weight` (LoHa, LoKr, full/diff, DoRA, GLoRA, patches carrying a
  `function` or a `strength_model`): right for every type Forge can apply, at the cost of a dense
  weight for that module, and reported by name.

Nothing here imports Forge: the merge function comes in as an argument, so the hermetic tests
drive this module with stand-ins that copy Forge's data layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from ...factors import DenseTerm, LoraFactors, LowRankTerm, ModuleDelta, hadamard_term, kronecker_term

ADDITIVE_TYPES = ("lora", "loha", "lokr", "diff")


@dataclass
class PatchedParam:
    """Everything known about one patched parameter of a Forge model."""

    key: str
    module: torch.nn.Module
    attr: str  # "weight" or "bias"
    guided: list = field(default_factory=list)  # Forge patch entries of guided LoRAs
    unguided: list = field(default_factory=list)
    online: bool = False


@dataclass
class ForgeFactors:
    """The guided LoRAs' deltas on one Forge model, plus what a swap needs and what was skipped."""

    factors: LoraFactors
    params: dict  # module -> PatchedParam (weight keys only)
    online: bool  # some guided patch is applied on the fly (Forge's "online"/fp16 LoRA mode)
    dense: list  # keys whose guided delta had to be dense
    skipped: list  # (key, reason)
    files: set  # guided filenames that contributed at least one patch

    @property
    def empty(self) -> bool:
        return not self.factors.nonzero()

    def message(self, model_label: str) -> Optional[str]:
        parts = []
        if self.dense:
            parts.append(f"{len(self.dense)} {model_label} layer(s) use an exact dense delta (non-low-rank LoRA type "
                         f"or DoRA), e.g. {self.dense[0]}")
        if self.skipped:
            parts.append(f"{len(self.skipped)} {model_label} patch(es) could not be removed from the base branch "
                         f"({self.skipped[0][1]}, e.g. {self.skipped[0][0]})")
        return "; ".join(parts) or None


def _is_adapter(v) -> bool:
    """A ComfyUI `weight_adapter` object (Forge Neo since December 2025): `name`, `weights` and
    `calculate_weight(...)` instead of a ("lora", (...)) tuple."""
    return hasattr(v, "weights") and hasattr(v, "calculate_weight")


def _patch_type(v) -> str:
    if _is_adapter(v):
        return str(getattr(v, "name", type(v).__name__)).lower()
    if isinstance(v, list):
        return "nested"
    if len(v) == 1:
        return "diff"
    return v[0] if isinstance(v[0], str) else "unknown"


def _weights(v) -> tuple:
    """A patch's factors: up, down, alpha, mid, dora_scale (and, for adapters, a reshape); older
    ComfyUI ports (Forge Classic) keep a LoRA's first four only, the rest is None."""
    weights = tuple(v.weights) if _is_adapter(v) else tuple(v[1])
    return weights + (None,) * (9 - len(weights))


def _fields(entry) -> tuple:
    """(strength_patch, v, strength_model, offset, function) of a patch entry: Forge main's 5-lists,
    ComfyUI's 5-tuples or Forge Neo 2.x's 6-tuples ending in the online flag, or Forge Classic's
    3-tuples (no offset, no function)."""
    return (tuple(entry) + (None, None))[:5]


def _is_additive(entry) -> bool:
    """merge_lora_to_weight adds this patch's delta independently of the weight."""
    _strength, v, strength_model, _offset, function = _fields(entry)
    if strength_model != 1.0 or function is not None:
        return False
    kind = _patch_type(v)
    if kind not in ADDITIVE_TYPES:
        return False
    w = _weights(v) if kind in ("lora", "lokr", "loha") else ()
    if kind == "lora" and (w[4] is not None or (len(w) > 5 and w[5] is not None)):  # DoRA, reshape
        return False
    if kind == "lokr" and len(w) > 8 and w[8] is not None:
        return False
    if kind == "loha" and len(w) > 7 and w[7] is not None:
        return False
    return True


def _low_rank_lycoris(kind: str, v, strength: float, weight_shape) -> Optional[LowRankTerm]:
    """A LoHa or LoKr patch as its exact low-rank term (factors.hadamard_term / kronecker_term), or
    None where it has none (Tucker factors, a full W2, DoRA)."""
    if kind == "loha":
        w1a, w1b, alpha, w2a, w2b, t1, _t2, dora = _weights(v)[:8]
        if t1 is not None or dora is not None:
            return None
        return hadamard_term(w1a, w1b, w2a, w2b, alpha, strength, weight_shape)
    w1, w2, alpha, w1a, w1b, w2a, w2b, t2, dora = _weights(v)[:9]
    if w2 is not None or w2a is None or t2 is not None or dora is not None:
        return None
    return kronecker_term((w1a.float() @ w1b.float()) if w1 is None else w1, w2a, w2b, alpha, strength, weight_shape)


def _low_rank_term(entry, weight_shape, module_kind: str, source: str) -> Optional[LowRankTerm]:
    """A LoRA/LoCon, LoHa or LoKr patch as a low-rank term, or None when it has no such form."""
    strength, v, _strength_model, offset, _function = _fields(entry)
    kind = _patch_type(v)
    if kind in ("loha", "lokr"):
        term = _low_rank_lycoris(kind, v, strength, weight_shape) if offset is None else None
        if term is not None:
            term.source = source
        return term
    if kind != "lora":
        return None
    up, down, alpha, mid, _dora = _weights(v)[:5]
    rank = down.shape[0]
    scale = float(strength) * (float(alpha) / rank if alpha is not None else 1.0)
    if module_kind == "linear":
        up, down = up.flatten(1), down.flatten(1)
        if mid is not None:
            return None
    term = LowRankTerm(down=down, up=up, mid=mid, scale=scale, source=source)
    if offset is not None:  # a slice of a fused layer (QKV): the factor padded with zeros
        dim, start, _length = offset
        if module_kind != "linear" or dim not in (0, 1):
            return None
        return term.embedded(weight_shape, dim, start)
    return term


def _module_delta(module: torch.nn.Module, weight: torch.Tensor) -> Optional[ModuleDelta]:
    # Forge's own layers (backend/operations.py) are not torch.nn.Linear subclasses.
    if weight.ndim == 2:
        return ModuleDelta("linear", [])
    if weight.ndim == 4 and hasattr(module, "stride"):
        return ModuleDelta("conv2d", [], tuple(module.stride), tuple(module.padding), tuple(module.dilation),
                           module.groups)
    return None


def merged_copy(merge: Callable, entries: list, weight: torch.Tensor, key: str) -> torch.Tensor:
    """The host's `merge_lora_to_weight` on a float32 copy of `weight`: ComfyUI's merge (Forge Neo
    2.x) adds the patches into the tensor it is given, which must never be a live or backed-up one."""
    return merge(entries, weight.detach().to(torch.float32, copy=True), key, computation_dtype=torch.float32)


def _entries_by_key(lora_patches: dict, guided_files: set) -> tuple[dict, set]:
    """{key: [(guided, entry, online)]} in the host's merge order, and the guided files that patch
    anything."""
    by_key, files = {}, set()
    for (filename, _strength_patch, _strength_model, online_mode), patches in lora_patches.items():
        guided = filename in guided_files
        for key, entries in patches.items():
            by_key.setdefault(key, []).extend(
                (guided, e, bool(e[5]) if len(e) > 5 else bool(online_mode)) for e in entries)
            if guided and entries:
                files.add(filename)
    return by_key, files


def _patched_module(model, key: str):
    """(module, attribute, parameter, ModuleDelta) of a patch key, or a string saying why not."""
    path, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(path)
        param = getattr(module, attr)
    except AttributeError:
        return "no such parameter in the model"
    if attr != "weight" or not isinstance(param, torch.Tensor):
        return f"patches on '{attr}' are not supported"
    delta = _module_delta(module, param)
    if delta is None:
        return f"{type(module).__name__} layers are not supported"
    return module, attr, param, delta


def _terms(key: str, param: torch.Tensor, kind: str, ordered: list, merge: Callable,
           original: Callable) -> tuple[list, bool]:
    """The guided patches' terms on one parameter (`ordered`: [(guided, entry, online)] in the
    host's merge order), and whether they needed a dense delta."""
    guided = [e for g, e, _ in ordered if g]
    unguided = [e for g, e, _ in ordered if not g]
    if all(_is_additive(e) for _, e, _ in ordered):
        terms = [_low_rank_term(e, tuple(param.shape), kind, key) for e in guided]
        if all(t is not None for t in terms):
            return terms, False
        # Additive but not low-rank (LoHa, LoKr, diff): the host's merge on a zero weight is the delta.
        rest = [e for e, t in zip(guided, terms) if t is None]
        dense = merged_copy(merge, rest, torch.zeros(param.shape, dtype=torch.float32), key)
        return [t for t in terms if t is not None] + [DenseTerm(dense.float(), source=key)], True
    # DoRA, OFT, GLoRA, functions, strength_model: merge(every patch) - merge(the unguided ones)
    w0 = original(key, param)
    full = merged_copy(merge, [e for _, e, _ in ordered], w0, key).float()
    part = merged_copy(merge, unguided, w0, key).float() if unguided else w0.detach().float()
    return [DenseTerm((full - part).to(w0.device), source=key)], True


def read_factors(model: torch.nn.Module, lora_patches: dict, guided_files: Iterable[str], *,
                 merge: Callable, original: Optional[Callable] = None) -> ForgeFactors:
    """The guided LoRAs' deltas on `model` (a patcher's `.model`), from `patcher.patch_sets`.
    Patches of an UNKNOWN_FILE are guided when UNKNOWN_FILE is among `guided_files`.

    `merge(patches, weight, key, computation_dtype=…)` is the host's `merge_lora_to_weight`;
    `original(key, current)` the weight before the LoRAs were merged (`patcher.originals`).
    """
    original = original or (lambda _key, current: current)
    by_key, files = _entries_by_key(lora_patches, set(guided_files))
    result = ForgeFactors(LoraFactors(), {}, False, [], [], files)
    for key, ordered in by_key.items():
        if not any(g for g, _, _ in ordered):
            continue
        found = _patched_module(model, key)
        if isinstance(found, str):
            result.skipped.append((key, found))
            continue
        module, attr, param, delta = found
        terms, dense = _terms(key, param, delta.kind, ordered, merge, original)
        if dense:
            result.dense.append(key)
        for term in terms:
            delta.add(term)
        online = any(m for g, _, m in ordered if g)
        result.online = result.online or online
        result.factors.deltas[module], result.factors.names[module] = delta, key.rpartition(".")[0]
        result.params[module] = PatchedParam(key, module, attr, [e for g, e, _ in ordered if g],
                                             [e for g, e, _ in ordered if not g], online)
    return result


def base_weight(info: PatchedParam, *, merge: Callable, original: Callable):
    """The exact weight of `info`'s parameter without the guided LoRAs (for `swap` and `dual`):
    the original (`patcher.originals`), with the unguided LoRAs merged back by the host's own
    function, on a copy."""
    current = getattr(info.module, info.attr)
    w0 = original(info.key, current)
    if w0 is current:
        raise RuntimeError(f"AutoLoRA: no original weight for {info.key} (the LoRA is not merged)")
    w = merged_copy(merge, info.unguided, w0, info.key) if info.unguided else w0.detach()
    return w.to(device=current.device, dtype=current.dtype)
