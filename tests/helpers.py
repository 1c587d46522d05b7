"""Shared builders for the hermetic suite: a seeded tiny model, kohya LoRA files, fingerprints."""
from __future__ import annotations

import hashlib

import torch

from demo.model import TinyDiffusionModel
from demo.kohya import factors_from_kohya, merge_into


def make_model(seed: int = 0, dtype=torch.float32) -> TinyDiffusionModel:
    torch.manual_seed(seed)
    model = TinyDiffusionModel()
    # Kaiming defaults leave some outputs tiny; widen them so LoRA effects are well above fp noise.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(1.5)
    return model.to(dtype).eval()


def fingerprint(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def lora_state_dict(model: TinyDiffusionModel, *, seed: int = 1, rank: int = 4, alpha: float = 2.0,
                    std: float = 0.15, unet: bool = True, te: bool = True, conv: bool = True,
                    tucker_mid: bool = False, only=None) -> dict:
    """A kohya-format LoRA on every Linear (and Conv2d if conv) of the model, random factors."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (path, module) in model.kohya_modules().items():
        if (name.startswith("lora_unet") and not unet) or (name.startswith("lora_te") and not te):
            continue
        if only is not None and not any(o in name for o in only):
            continue
        if isinstance(module, torch.nn.Conv2d):
            if not conv:
                continue
            out_c, in_c, kh, kw = module.weight.shape
            if tucker_mid and kh > 1:
                sd[f"{name}.lora_down.weight"] = torch.randn(rank, in_c, 1, 1, generator=g) * std
                sd[f"{name}.lora_mid.weight"] = torch.randn(rank, rank, kh, kw, generator=g) * std
            else:
                sd[f"{name}.lora_down.weight"] = torch.randn(rank, in_c, kh, kw, generator=g) * std
            sd[f"{name}.lora_up.weight"] = torch.randn(out_c, rank, 1, 1, generator=g) * std
        else:
            out_f, in_f = module.weight.shape
            sd[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * std
            sd[f"{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * std
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    return sd


def write_lora(path, state_dict) -> str:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return str(path)


def merged_copy(seed, loras, dtype=torch.float32):
    """A fresh model with `loras` ([(state_dict_or_path, strength)]) merged into its weights."""
    model = make_model(seed, torch.float32)
    for lora, strength in loras:
        merge_into(factors_from_kohya(lora, model.kohya_modules(), strength=strength))
    return model.to(dtype)


def labels(model, classes):
    return torch.tensor(classes, dtype=torch.long)


def settings_from_infotext(infotext: dict):
    """What pasting an infotext into the UI and generating gives (PNG Info -> Send to txt2img)."""
    from lib_autolora import params
    return params.settings_from_args([params.paste_value(p, infotext) for p in params.PARAMS] +
                                     [params.paste_unset(p, infotext) for p in params.UNSET_BOXES])
