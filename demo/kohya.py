"""Reader for kohya-format LoRA safetensors (the standalone path, the demo and the tests).

Keys look like `lora_unet_<module path with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`,
`.lora_mid.weight` (LoCon Tucker); `lora_te_` (SD1.5 text encoder) and `lora_te1_` / `lora_te2_`
(SDXL's two text encoders). LoHa (`hada_*`), LoKr (`lokr_*`) and full (`diff`) become exact
dense deltas; IA3 and OFT are reported as skipped, never silently half-applied.
The WebUI adapters read factors from the hosts' own loaded networks instead.
"""
from __future__ import annotations

import warnings
from typing import Mapping, Optional, Union

import torch

from lib_autolora.factors import DenseTerm, LoraFactors, LowRankTerm

KOHYA_PREFIXES = ("lora_unet", "lora_te1", "lora_te2", "lora_te")


class LoraMismatchError(ValueError):
    """The LoRA names modules that the model does not have."""


def load_state_dict(path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


def group_by_module(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """{'lora_unet_x_y': {'lora_down.weight': T, 'alpha': T, ...}}"""
    groups: dict = {}
    for key, tensor in state_dict.items():
        module, _, suffix = key.partition(".")
        groups.setdefault(module, {})[suffix] = tensor
    return groups


def kohya_names(root: torch.nn.Module, prefix: str) -> dict:
    """Map kohya module names (`prefix_` + dotted path with `_`) to the model's Linear/Conv2d modules."""
    names = {}
    for name, module in root.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name:
            names[f"{prefix}_{name.replace('.', '_')}"] = (name, module)
    return names


def _alpha_scale(parts: dict, rank: int) -> float:
    alpha = parts.get("alpha")
    return float(alpha) / rank if alpha is not None else 1.0


def _loha_delta(parts, shape) -> torch.Tensor:
    if "hada_t1" in parts:
        raise NotImplementedError("LoHa with Tucker decomposition (hada_t1/t2)")
    w1 = parts["hada_w1_a"].float() @ parts["hada_w1_b"].float()
    w2 = parts["hada_w2_a"].float() @ parts["hada_w2_b"].float()
    scale = _alpha_scale(parts, parts["hada_w1_b"].shape[0])
    return (w1 * w2 * scale).reshape(shape)


def _lokr_delta(parts, shape) -> torch.Tensor:
    if "lokr_t2" in parts:
        raise NotImplementedError("LoKr with Tucker decomposition (lokr_t2)")
    w1 = parts["lokr_w1"].float() if "lokr_w1" in parts else parts["lokr_w1_a"].float() @ parts["lokr_w1_b"].float()
    w2 = parts["lokr_w2"].float() if "lokr_w2" in parts else parts["lokr_w2_a"].float() @ parts["lokr_w2_b"].float()
    rank = parts["lokr_w1_b"].shape[0] if "lokr_w1_b" in parts else (
        parts["lokr_w2_b"].shape[0] if "lokr_w2_b" in parts else None)
    scale = _alpha_scale(parts, rank) if rank else 1.0
    delta = torch.kron(w1.reshape(*w1.shape, *([1] * (w2.ndim - w1.ndim))), w2) if w2.ndim > w1.ndim else torch.kron(w1, w2)
    return (delta * scale).reshape(shape)


def term_for(parts: dict, module: torch.nn.Module, strength: float, source: str):
    """One kohya module group -> LowRankTerm / DenseTerm. Raises NotImplementedError for IA3/OFT."""
    weight_shape = tuple(module.weight.shape)
    if "lora_down.weight" in parts:
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        rank = down.shape[0]
        mid = parts.get("lora_mid.weight")
        if isinstance(module, torch.nn.Linear) and down.ndim == 4:
            down, up = down.flatten(1), up.flatten(1)
        return LowRankTerm(down=down, up=up, mid=mid, scale=_alpha_scale(parts, rank) * strength, source=source)
    if "hada_w1_a" in parts:
        return DenseTerm(_loha_delta(parts, weight_shape) * strength, source=source)
    if any(k.startswith("lokr_") for k in parts):
        return DenseTerm(_lokr_delta(parts, weight_shape) * strength, source=source)
    if "diff" in parts:
        bias = parts.get("diff_b")
        return DenseTerm(parts["diff"].float().reshape(weight_shape) * strength,
                         None if bias is None else bias.float() * strength, source=source)
    kinds = "IA3" if "weight" in parts and "on_input" in parts else ("OFT" if any("oft" in k for k in parts) else
                                                                     "unknown")
    raise NotImplementedError(f"{kinds} network type (keys: {', '.join(sorted(parts))})")


def factors_from_kohya(lora: Union[str, Mapping[str, torch.Tensor]], modules: Mapping[str, tuple], *,
                       strength: float = 1.0, strengths: Optional[Mapping[str, float]] = None,
                       into: Optional[LoraFactors] = None, strict: bool = True, source: str = "") -> LoraFactors:
    """Read one LoRA into `into` (or a new LoraFactors).

    `modules` maps kohya names to (model path, module), e.g. from `kohya_names`. `strengths` maps a
    prefix (`lora_unet`, `lora_te`, ...) to its multiplier, like A1111's `<lora:name:te:unet>`.
    A LoRA naming modules the model lacks raises LoraMismatchError (strict) or warns and skips
    those groups in the factors and in anything merged from them, so the two never disagree.
    """
    state_dict = load_state_dict(lora) if isinstance(lora, (str,)) or hasattr(lora, "__fspath__") else lora
    source = source or (str(lora) if not isinstance(lora, Mapping) else "<state dict>")
    factors = into if into is not None else LoraFactors()
    unmatched, skipped = [], []
    for kohya_name, parts in group_by_module(state_dict).items():
        found = modules.get(kohya_name)
        if found is None:
            unmatched.append(kohya_name)
            continue
        path, module = found
        prefix = next((p for p in KOHYA_PREFIXES if kohya_name.startswith(p + "_")), "")
        mult = (strengths or {}).get(prefix, strength)
        try:
            term = term_for(parts, module, mult, source)
        except NotImplementedError as exc:
            skipped.append((kohya_name, str(exc)))
            continue
        factors.add(module, path, term)
    factors.unmatched.extend(unmatched)
    factors.skipped.extend(skipped)
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
        message = f"AutoLoRA: LoRA {source} names {len(unmatched)} module(s) the model lacks: {shown}"
        if strict:
            raise LoraMismatchError(message)
        warnings.warn(message + " (skipped in both branches)")
    if skipped:
        warnings.warn(f"AutoLoRA: LoRA {source}: skipped {len(skipped)} module(s) of unsupported type: "
                      f"{skipped[0][1]}")
    return factors


def merge_into(factors: LoraFactors) -> None:
    """Add every delta to its module's weights in place, as a host's merged LoRA mode does."""
    with torch.no_grad():
        for module, delta in factors.deltas.items():
            module.weight.add_(delta.delta_weight().to(module.weight.device, module.weight.dtype))
            bias = delta.delta_bias()
            if bias is not None and module.bias is not None:
                module.bias.add_(bias.to(module.bias.device, module.bias.dtype))
