"""Stand-ins for the `ldm_patched` WebUIs, copied from their code where the extension touches it:
reForge `main` @ 3b56b268 and Forge Classic `classic` @ 1f95d717.

Forge Classic:
- `StandInClassicModelPatcher` = ldm_patched/modules/model_patcher.py `ModelPatcher` (+ modules_forge's
  UnetPatcher): `add_patches(patches, strength_patch, strength_model)` keeps 3-tuples
  (strength_patch, v, strength_model) with `v = ("lora", (up, down, alpha, mid))`; `clone()` copies the
  patches and model options but records no parent and starts its own `backup` (a plain tensor per
  key); `calculate_weight(patches, weight, key)` merges **in place**; `patch_model()` backs the weight
  up and merges a float32 copy; `add_conditioning_modifier`.
- `classic_step` = modules_forge/forge_sampler.py `forge_sample`: the conditioning modifiers
  (model, x, timestep, uncond, cond, cond_scale, model_options, seed), then Forge's sampling function
  (standins/forge.py: pre-CFG list, calc_cond_uncond_batch with cond marks, CFG function, post-CFG).

reForge:
- the patcher is ComfyUI's (standins/forge_neo2.py: 5-tuples, weight adapters, parent, a shared
  backup), its merge `ldm_patched.modules.lora.calculate_weight(..., intermediate_dtype=)` in place;
- `reforge_step` = modules/sd_samplers_cfg_denoiser.py `CFGDenoiser.forward`'s tail: the conditioning
  modifiers, then (a skipped uncond: `None` and CFG scale 1) ldm_patched/modules/samplers.py
  `sampling_function`: CFG 1 drops the uncond, `calc_cond_batch` (no cond marks, every condition
  sized for the memory estimate), ComfyUI's `sampler_pre_cfg_function(args)` after the conds,
  `cfg_function` (its uncond-less default is the cond prediction; post-CFG list).
"""
from __future__ import annotations

import math

import torch

from standins.forge import standin_calc_cond_uncond_batch, standin_sampling_function_inner


def classic_lora_patch(shape, rank, seed, alpha=2.0):
    """("lora", (up, down, alpha, mid)): what Classic's load_lora makes of a kohya LoRA key."""
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(shape[0], rank, *((1, 1) if len(shape) == 4 else ()), generator=g) * 0.4
    down = torch.randn(rank, *shape[1:], generator=g) * 0.4
    return ("lora", (up, down, torch.tensor(alpha), None))


class StandInClassicModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, current_device=None, weight_inplace_update=False):
        self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
        self.patches = {}
        self.backup = {}
        self.model_options = {"transformer_options": {}}
        self.model_keys = set(model.state_dict().keys())
        self.extra_preserved_memory_during_sampling = 0

    def clone(self):
        n = StandInClassicModelPatcher(self.model, self.load_device, self.offload_device, self.size)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.model_options = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
                           for k, v in self.model_options.items()}
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        for k in patches:
            if k in self.model_keys:
                self.patches.setdefault(k, []).append((strength_patch, patches[k], strength_model))
        return list(patches)

    def calculate_weight(self, patches, weight, key):
        for alpha, v, strength_model in patches:
            if strength_model != 1.0:
                weight *= strength_model
            kind, v = ("diff", v) if len(v) == 1 else v
            if kind == "diff":
                weight += alpha * v[0].to(weight.device, weight.dtype)
            elif kind == "lora":
                up, down, scale, mid = v
                scale = float(scale) / down.shape[0] if scale is not None else 1.0
                weight += (alpha * scale) * torch.mm(up.flatten(1).float(), down.flatten(1).float()).reshape(
                    weight.shape).to(weight.dtype)
            else:
                raise ValueError(kind)
        return weight

    def patch_model(self):
        for key in self.patches:
            path, _, attr = key.rpartition(".")
            module = self.model.get_submodule(path)
            weight = getattr(module, attr)
            if key not in self.backup:
                self.backup[key] = weight.to(device=self.offload_device)
            out = self.calculate_weight(self.patches[key], weight.to(torch.float32, copy=True), key).to(weight.dtype)
            setattr(module, attr, torch.nn.Parameter(out, requires_grad=False))

    def add_conditioning_modifier(self, modifier):
        self.model_options["conditioning_modifiers"] = self.model_options.get("conditioning_modifiers", []) + [modifier]

    def add_extra_preserved_memory_during_sampling(self, memory_in_bytes):
        self.extra_preserved_memory_during_sampling += memory_in_bytes


def run_modifiers(model, x, timestep, uncond, cond, cond_scale, model_options, seed=0):
    for modifier in model_options.get("conditioning_modifiers", []):
        model, x, timestep, uncond, cond, cond_scale, model_options, seed = modifier(
            model, x, timestep, uncond, cond, cond_scale, model_options, seed)
    return model, x, timestep, uncond, cond, cond_scale, model_options, seed


def classic_step(model, x, timestep, uncond, cond, cond_scale, model_options):
    model, x, timestep, uncond, cond, cond_scale, model_options, _ = run_modifiers(
        model, x, timestep, uncond, cond, cond_scale, model_options)
    return standin_sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options)


def _sized_calc(model, cond, uncond, x_in, timestep, model_options):
    """calc_cond_batch: every condition sized for the memory estimate, no cond marks."""
    for entries in (cond, uncond or []):
        for entry in entries:
            for value in entry["model_conds"].values():
                value.process_cond(batch_size=x_in.shape[0], device=x_in.device).size()
    return standin_calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options, compute_cond_mark=False)


def reforge_sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options, seed=None):
    uncond_ = None if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization") else uncond
    out = list(_sized_calc(model, cond, uncond_, x, timestep, model_options))
    for fn in model_options.get("sampler_pre_cfg_function", []):
        out = fn({"conds": [cond, uncond_], "conds_out": out, "cond_scale": cond_scale, "timestep": timestep,
                  "input": x, "sigma": timestep, "model": model, "model_options": model_options})
    cond_pred, uncond_pred = out
    edit_strength = sum(item.get("strength", 1) for item in cond)
    if "sampler_cfg_function" in model_options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": timestep,
                "input": x, "sigma": timestep, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                "model": model, "model_options": model_options}
        result = x - model_options["sampler_cfg_function"](args)
    elif uncond_ is None:
        result = cond_pred
    elif not math.isclose(edit_strength, 1.0):
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        result = fn({"denoised": result, "cond": cond, "uncond": uncond_, "cond_scale": cond_scale, "model": model,
                     "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
                     "model_options": model_options, "input": x})
    return result


def reforge_step(model, x, timestep, uncond, cond, cond_scale, model_options, skip_uncond=False):
    model, x, timestep, uncond, cond, cond_scale, model_options, seed = run_modifiers(
        model, x, timestep, uncond, cond, cond_scale, model_options)
    if skip_uncond:  # NGMS / skip early CFG: decided before, applied after the modifiers
        return reforge_sampling_function(model, x, timestep, None, cond, 1.0, model_options, seed)
    return reforge_sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options, seed)


def standin_script_callbacks(host: str):
    """modules/script_callbacks.py's `on_cfg_after_cfg` registrar: reForge's (and A1111 1.8+'s)
    takes `(callback, *, name=None)`, Forge Classic's `(callback)` alone; both append a
    ScriptCallback(filename, callback[, name]) to `callback_map['cfg_after_cfg']`."""
    import types
    module = types.ModuleType("modules.script_callbacks")
    module.registered = []
    if host == "classic":
        def on_cfg_after_cfg(callback):
            module.registered.append((callback, None))
    else:
        def on_cfg_after_cfg(callback, *, name=None):
            module.registered.append((callback, name))
    module.on_cfg_after_cfg = on_cfg_after_cfg
    return module
