"""Stand-ins for Forge Neo release 2.26 (ComfyUI v0.27.1's ModelPatcher), copied from the 2.26 tree
(exo101/sd-webui-forge-neo-v3 @ de2193d, folder webui/) where the extension touches it:

- `StandInComfyModelPatcher` = backend/patcher/base.py `ModelPatcher`: `patches` {key: [6-tuples
  (strength_patch, adapter, strength_model, offset, function, online)]} without the file,
  `add_patches(patches, strength_patch, strength_model, *, filename, online_mode)`, `clone()` that
  records `parent` and shares `backup`, `patch_weight_to_device` (original into `backup[key]` as a
  (weight, inplace_update) namedtuple, the merge on a float32 copy, `set_attr` of a new Parameter),
  `unpatch_model` (originals back, backup cleared);
- `standin_merge_lora_to_weight` = backend/patcher/lora.py `merge_lora_to_weight`: **in place** on
  the tensor it is given (no clone, no cast), adapters by `calculate_weight`, "diff"/"set" tuples,
  anything else raises;
- `StandInLoRAAdapter` = comfy/weight_adapter/lora.py `LoRAAdapter` with DoRA's `weight_decompose`
  (in place: `weight[:] = weight_calc`);
- `standin_load_lora_for_models` = extensions-builtin/sd_forge_lora/networks.py: one clone of the
  UNet and the CLIP patcher per LoRA, `add_patches(filename=...)` (the file is not kept);
- backend/sampling/sampling_function.py's `sampling_function_inner` is Forge main's (standins/forge.py)
  plus the context-window branch (`dynamic_args.context_handler.should_use_context(x)` →
  `execute(calc, model, [cond, uncond], x, timestep, model_options)`); the sampler's model options
  are merged into the patcher's with `join_dicts` (nested dicts merged, lists concatenated);
- `standin_get_learned_conditioning(model, prompts, steps, hires_steps=None)`: 4 arguments.

`StandInComfyModelPatcher229` is release 2.29.1's ModelPatcher (ComfyUI v0.33.1's), copied from its
source as published (youlijie/sd-webui-forge-classic, release "2.29.1"; no 2.29 tree could be
installed and run here): merged LoRAs as 5-tuples in `patches` (no online flag), an online LoRA as
one `OnlineLoRAPatch(filename, key, [entry])` per key in `weight_wrapper_patches`, which `load()`
puts into each layer's `weight_function` and the layer applies to a copy of its weight per forward
(standins/forge.py `standin_get_weight_and_bias`).
"""
from __future__ import annotations

import collections

import torch



def standin_merge_lora_to_weight(patches, weight, key, computation_dtype=torch.float32):
    for p in patches:
        strength, v, strength_model, offset, function = p[:5]
        function = function or (lambda a: a)
        old_weight = None
        if offset is not None:
            old_weight, weight = weight, weight.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            weight *= strength_model
        if hasattr(v, "calculate_weight"):
            weight = v.calculate_weight(weight, key, strength, strength_model, offset, function, computation_dtype)
            if old_weight is not None:
                weight = old_weight
            continue
        patch_type, v = ("diff", v) if len(v) == 1 else (v[0], v[1])
        if patch_type == "diff":
            weight += function(strength * v[0].to(weight.device, weight.dtype))
        elif patch_type == "set":
            weight.copy_(v[0])
        else:
            raise ValueError(f'"{key}" of type "{patch_type}" is not recognized...')
        if old_weight is not None:
            weight = old_weight
    return weight


def standin_weight_decompose(dora_scale, weight, lora_diff, alpha, strength, computation_dtype, function):
    dora_scale = dora_scale.to(weight.device, computation_dtype)
    lora_diff *= alpha
    weight_calc = weight + function(lora_diff).type(weight.dtype)
    weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(
        weight.shape[0], *[1] * (weight.dim() - 1)) + torch.finfo(weight.dtype).eps
    weight_calc *= (dora_scale / weight_norm).type(weight.dtype)
    if strength != 1.0:
        weight_calc -= weight
        weight += strength * weight_calc
    else:
        weight[:] = weight_calc
    return weight


class StandInLoRAAdapter:
    name = "lora"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys, self.weights = loaded_keys, weights

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        up, down, alpha, mid, dora_scale, reshape = self.weights
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        diff = torch.mm(up.flatten(1).to(intermediate_dtype), down.flatten(1).to(intermediate_dtype)).reshape(weight.shape)
        if dora_scale is not None:
            return standin_weight_decompose(dora_scale, weight, diff, scale, strength, intermediate_dtype, function)
        weight += function(((strength * scale) * diff).type(weight.dtype))
        return weight


def lora_adapter(shape, rank, seed, alpha=2.0, dora=False):
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(shape[0], rank, *((1, 1) if len(shape) == 4 else ()), generator=g) * 0.4
    down = torch.randn(rank, *shape[1:], generator=g) * 0.4
    dora_scale = (torch.rand(shape[0], 1, generator=g) + 0.5) if dora else None
    return StandInLoRAAdapter(set(), (up, down, alpha, None, dora_scale, None))


Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])


def _set_attr(model, key, value):
    path, _, attr = key.rpartition(".")
    setattr(model.get_submodule(path) if path else model, attr, torch.nn.Parameter(value, requires_grad=False))


class StandInComfyModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, *, current_device=None,
                 weight_inplace_update=False):
        self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
        self.patches = {}
        self.backup = {}
        self.model_options = {"transformer_options": {}}
        self.parent = None
        self.weight_inplace_update = weight_inplace_update
        self.patches_uuid = object()
        self.extra_preserved_memory_during_sampling = 0  # the UNet's patcher (UnetPatcher) adds this

    def add_extra_preserved_memory_during_sampling(self, memory_in_bytes):
        self.extra_preserved_memory_during_sampling += memory_in_bytes

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size,
                           weight_inplace_update=self.weight_inplace_update)
        n.patches_uuid = self.patches_uuid
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.model_options = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
                           for k, v in self.model_options.items()}
        n.parent = self
        n.backup = self.backup
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0, *, filename=None, online_mode=None):
        model_sd = self.model.state_dict()
        self.patches_uuid = object()
        added = []
        for k, v in patches.items():
            key, offset, function = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
            if key in model_sd:
                added.append(k)
                self.patches.setdefault(key, []).append((strength_patch, v, strength_model, offset, function, online_mode))
        return added

    def patch_weight_to_device(self, key):
        weight = self.model.get_parameter(key)
        if key not in self.patches:
            return
        if key not in self.backup:
            self.backup[key] = Backup(weight.to(device=self.offload_device, copy=self.weight_inplace_update),
                                      self.weight_inplace_update)
        temp = weight.to(torch.float32, copy=True)
        out = standin_merge_lora_to_weight(self.patches[key], temp, key).to(weight.dtype)
        _set_attr(self.model, key, out)

    def patch_model(self):
        for key in self.patches:
            self.patch_weight_to_device(key)

    def unpatch_model(self):
        for key, saved in self.backup.items():
            _set_attr(self.model, key, saved.weight)
        self.backup.clear()


class StandInOnlineLoRAPatch:
    """2.29.1 backend/patcher/base.py `OnlineLoRAPatch`: one LoRA's entry on one weight, merged into
    the weight it is given in each forward."""

    def __init__(self, name, key, patch):
        self.name, self.key, self.patch = name, key, [patch]

    def __call__(self, weight):
        return standin_merge_lora_to_weight(self.patch, weight, self.key, computation_dtype=weight.dtype)


class StandInComfyModelPatcher229(StandInComfyModelPatcher):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_wrapper_patches = {}

    def clone(self):
        n = super().clone()
        n.weight_wrapper_patches = self.weight_wrapper_patches.copy()
        return n

    def add_weight_wrapper(self, name, function):
        self.weight_wrapper_patches[name] = self.weight_wrapper_patches.get(name, []) + [function]

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0, *, filename=None, online_mode=None):
        model_sd = self.model.state_dict()
        added = []
        for k in patches:
            key, offset, function = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
            if key in model_sd:
                added.append(k)
                if online_mode:
                    self.add_weight_wrapper(key, StandInOnlineLoRAPatch(
                        filename, k, [strength_patch, patches[k], strength_model, offset, function]))
                else:
                    current = self.patches.pop(key, [])
                    current.append((strength_patch, patches[k], strength_model, offset, function))
                    self.patches[key] = current
        self.patches_uuid = object()
        return added

    def load_weight_functions(self):
        """What `load()` gives each layer: its weight's wrappers as `weight_function`."""
        for key, wrappers in self.weight_wrapper_patches.items():
            path, _, _attr = key.rpartition(".")
            self.model.get_submodule(path).weight_function = list(wrappers)


def standin_load_lora_for_models(unet, clip, unet_patches, clip_patches, strength, filename, online_mode=False):
    """networks.load_lora_for_models after load_lora matched the keys: a clone per patcher it changes."""
    if unet is not None and unet_patches:
        unet = unet.clone()
        unet.add_patches(filename=filename, patches=unet_patches, strength_patch=strength, online_mode=online_mode)
    if clip is not None and clip_patches:
        clip = clip.clone()
        clip.add_patches(filename=filename, patches=clip_patches, strength_patch=strength, online_mode=online_mode)
    return unet, clip


def join_dicts(base_dict, update_dict):
    if not update_dict:
        return (base_dict or {}).copy()
    result = (base_dict or {}).copy()
    for key, value in update_dict.items():
        if key in result and isinstance(result[key], dict) and isinstance(value, dict):
            result[key] = join_dicts(result[key], value)
        elif key in result and isinstance(result[key], list) and isinstance(value, list):
            result[key] = result[key] + value
        else:
            result[key] = value
    return result


class StandInContextHandler:
    """backend/args.py dynamic_args.context_handler (IndexListContextHandler), which slides windows
    over a video's frames: here one window over everything, recording what it was asked to run."""

    def __init__(self):
        self.calls = []

    def should_use_context(self, x):
        return True

    def execute(self, calc, model, conds, x, timestep, model_options):
        self.calls.append(len(conds[0]))
        return calc(model, conds[0], conds[1], x, timestep, model_options)


def standin_get_learned_conditioning(model, prompts, steps, hires_steps=None):
    return model.encode(prompts, steps, hires_steps)


class StandInLoHaAdapter:
    """comfy/weight_adapter/loha.py LoHaAdapter: weights (w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale);
    adds strength · alpha / rank(w1b) · ((w1a @ w1b) ⊙ (w2a @ w2b)) reshaped (no CP, no DoRA here)."""

    name = "loha"

    def __init__(self, weights):
        self.weights = weights

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale = self.weights
        alpha = alpha / w1b.shape[0] if alpha is not None else 1.0
        m1 = torch.mm(w1a.to(intermediate_dtype), w1b.to(intermediate_dtype))
        m2 = torch.mm(w2a.to(intermediate_dtype), w2b.to(intermediate_dtype))
        weight += function(((strength * alpha) * (m1 * m2).reshape(weight.shape)).type(weight.dtype))
        return weight


class StandInLoKrAdapter:
    """comfy/weight_adapter/lokr.py LoKrAdapter: weights (w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, t2,
    dora_scale); adds strength · alpha / dim · kron(w1, w2) (no Tucker, no DoRA here)."""

    name = "lokr"

    def __init__(self, weights):
        self.weights = weights

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, t2, dora_scale = self.weights
        dim = None
        if w1 is None:
            dim = w1_b.shape[0]
            w1 = torch.mm(w1_a.to(intermediate_dtype), w1_b.to(intermediate_dtype))
        if w2 is None:
            dim = w2_b.shape[0]
            w2 = torch.mm(w2_a.to(intermediate_dtype), w2_b.to(intermediate_dtype))
        if len(w2.shape) == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        alpha = alpha / dim if alpha is not None and dim is not None else 1.0
        weight += function(((strength * alpha) * torch.kron(w1, w2).reshape(weight.shape)).type(weight.dtype))
        return weight
