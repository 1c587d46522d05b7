"""Stand-ins for the parts of Stable Diffusion WebUI Forge (main @ dfdcbab6) the extension touches.

They copy what the adapter relies on, call order included (no Forge code is imported; the real
thing is exercised by tests/e2e):
- `standin_sampling_function_inner` = backend/sampling/sampling_function.py `sampling_function_inner`
  (cfg1 optimization, `sampler_pre_cfg_function` list, `calc_cond_uncond_batch`,
  `sampler_cfg_function` or the edit-strength formula, `sampler_post_cfg_function` list);
- `standin_calc_cond_uncond_batch` = `calc_cond_uncond_batch` without areas and masks: entries are
  batched by `can_concat`, at most `max_entries` per forward (Forge's free-memory limit),
  `model_function_wrapper(apply_model, {input, timestep, c, cond_or_uncond})`, outputs accumulated
  with `mult` = strength and divided by the count;
- `StandInCondition` / `StandInConditionCrossAttn`, `standin_compile_*` = backend/sampling/condition.py;
- `standin_merge_lora_to_weight` = backend/patcher/lora.py `merge_lora_to_weight` for the "lora" and
  "diff" patch types, with `offset`, `strength_model` and `function`;
- `StandInKModel` stands in for KModel (`apply_model(x, t, c_crossattn=…, y=…, transformer_options=…)`)
  with Forge's offline LoRA state: merged weights, originals in `lora_loader.backup`.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from lib_autolora.hosts.forge.fused import OUR_KEYS



def standin_merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    weight = weight.clone() if weight.dtype == computation_dtype else weight.to(dtype=computation_dtype)
    for strength, v, strength_model, offset, function in patches:
        function = function or (lambda a: a)
        old = None
        if offset is not None:
            old, weight = weight, weight.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            weight *= strength_model
        if len(v) == 1:
            weight += strength * v[0].to(weight)
        elif v[0] == "lora":
            up, down, alpha, mid, _dora = v[1]
            scale = alpha / down.shape[0] if alpha is not None else 1.0
            diff = torch.mm(up.flatten(1).float(), down.flatten(1).float()).reshape(weight.shape)
            weight += function((strength * scale) * diff).to(weight.dtype)
        else:
            raise NotImplementedError(v[0])
        if old is not None:
            weight = old
    return weight


class StandInCondition:
    def __init__(self, cond):
        self.cond = cond

    def process_cond(self, batch_size, device, **kwargs):
        c = self.cond
        if c.shape[0] < batch_size:
            c = c.repeat([math.ceil(batch_size / c.shape[0])] + [1] * (c.ndim - 1))[:batch_size]
        return type(self)(c[:batch_size].to(device))

    def can_concat(self, other):
        return self.cond.shape == other.cond.shape

    def size(self):  # ldm_patched's CONDRegular.size(), which reForge's memory estimate reads
        return list(self.cond.size())

    def concat(self, others):
        return torch.cat([self.cond] + [o.cond for o in others])


class StandInConditionCrossAttn(StandInCondition):
    pass


def standin_compile_conditions(cond):
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return [dict(cross_attn=cond, model_conds=dict(c_crossattn=StandInConditionCrossAttn(cond)))]
    result = dict(cross_attn=cond["crossattn"], pooled_output=cond["vector"],
                  model_conds=dict(c_crossattn=StandInConditionCrossAttn(cond["crossattn"]),
                                   y=StandInCondition(cond["vector"])))
    if "guidance" in cond:  # Flux: the distilled CFG scale travels as a condition of its own
        result["model_conds"]["guidance"] = StandInCondition(cond["guidance"])
    return [result]


def standin_compile_weighted_conditions(cond, weights):
    results = []
    for cond_pre in map(list, zip(*weights)):
        indices = [i for i, _ in cond_pre]
        feed = {k: v[indices] for k, v in cond.items()} if isinstance(cond, dict) else cond[indices]
        h = standin_compile_conditions(feed)
        h[0]["strength"] = cond_pre[-1][1]
        results += h
    return results


def standin_compute_cond_mark(cond_or_uncond, sigmas):
    return torch.tensor([c for c in cond_or_uncond for _ in range(sigmas.shape[0])]).to(sigmas)


def standin_compute_cond_indices(cond_or_uncond, sigmas):
    n, cond, uncond = sigmas.shape[0], [], []
    for i, c in enumerate(cond_or_uncond):
        (cond if c == 0 else uncond).extend(range(i * n, (i + 1) * n))
    return cond, uncond


def standin_calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options, max_entries=99,
                                   compute_cond_mark=None):
    out = {0: torch.zeros_like(x_in), 1: torch.zeros_like(x_in)}
    count = {0: torch.ones_like(x_in) * 1e-37, 1: torch.ones_like(x_in) * 1e-37}
    to_run = []
    for kind, entries in ((0, cond), (1, uncond)):
        for e in entries or []:
            conditioning = {k: v.process_cond(batch_size=x_in.shape[0], device=x_in.device)
                            for k, v in e["model_conds"].items()}
            to_run.append((x_in, torch.ones_like(x_in) * e.get("strength", 1.0), conditioning, kind))
    while to_run:
        first = to_run[0]
        batch = [i for i, r in enumerate(to_run) if r[2].keys() == first[2].keys() and
                 all(r[2][k].can_concat(first[2][k]) for k in first[2])][:max_entries]
        picked = [to_run[i] for i in batch]
        for i in reversed(batch):
            to_run.pop(i)
        input_x = torch.cat([r[0] for r in picked])
        c = {k: picked[0][2][k].concat([r[2][k] for r in picked[1:]]) for k in first[2]}
        cou = [r[3] for r in picked]
        to = dict(model_options.get("transformer_options", {}))
        to.update(cond_or_uncond=cou[:], sigmas=timestep)
        if compute_cond_mark is not False:  # reForge marks no rows
            to["cond_mark"] = (compute_cond_mark or standin_compute_cond_mark)(cou, timestep)
            to["cond_indices"], to["uncond_indices"] = standin_compute_cond_indices(cou, timestep)
        c["transformer_options"] = to
        t = torch.cat([timestep] * len(cou))
        if "model_function_wrapper" in model_options:
            output = model_options["model_function_wrapper"](
                model.apply_model, {"input": input_x, "timestep": t, "c": c, "cond_or_uncond": cou}).chunk(len(cou))
        else:
            output = model.apply_model(input_x, t, **c).chunk(len(cou))
        for o, r in zip(output, picked):
            out[r[3]] += o * r[1]
            count[r[3]] += r[1]
    return out[0] / count[0], out[1] / count[1]


def standin_sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options,
                                    calc=standin_calc_cond_uncond_batch, *, context_handler=None):
    """`context_handler`: Forge Neo 2.x's branch for context windows (dynamic_args.context_handler)."""
    edit_strength = sum(item.get("strength", 1) for item in cond)
    uncond_ = None if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization") else uncond
    for fn in model_options.get("sampler_pre_cfg_function", []):
        model, cond, uncond_, x, timestep, model_options = fn(model, cond, uncond_, x, timestep, model_options)
    if getattr(context_handler, "should_use_context", lambda *args: False)(x):
        cond_pred, uncond_pred = context_handler.execute(calc, model, [cond, uncond_], x, timestep, model_options)
    else:
        cond_pred, uncond_pred = calc(model, cond, uncond_, x, timestep, model_options)
    if "sampler_cfg_function" in model_options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": timestep,
                "input": x, "sigma": timestep, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                "model": model, "model_options": model_options}
        result = x - model_options["sampler_cfg_function"](args)
    elif not math.isclose(edit_strength, 1.0):
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        result = fn({"denoised": result, "cond": cond, "uncond": uncond, "model": model, "uncond_denoised": uncond_pred,
                     "cond_denoised": cond_pred, "sigma": timestep, "model_options": model_options, "input": x})
    return result


def standin_get_weight_and_bias(layer):
    """backend/operations.py `get_weight_and_bias` (Forge Neo 2.29): the layer's `weight_function`s
    (patches applied in each forward: online LoRAs, low-VRAM layers) on a copy of its weight."""
    weight = layer.weight
    if getattr(layer, "weight_function", None):
        weight = weight.clone()
        for f in layer.weight_function:
            weight = f(weight)
    return weight, layer.bias


class StandInLinear(torch.nn.Module):
    """Forge's ForgeOperations.Linear is a torch.nn.Module, not a torch.nn.Linear."""

    def __init__(self, i, o):
        super().__init__()
        self.in_features, self.out_features = i, o
        self.weight = torch.nn.Parameter(torch.randn(o, i) / i ** 0.5, requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(o) * 0.1, requires_grad=False)

    def forward(self, x):
        return torch.nn.functional.linear(x, *standin_get_weight_and_bias(self))


class StandInConv2d(torch.nn.Conv2d):
    """ForgeOperations.Conv2d: a torch.nn.Conv2d whose forward applies its weight functions."""

    def forward(self, x):
        return self._conv_forward(x, *standin_get_weight_and_bias(self))


class TinyNet(torch.nn.Module):
    def __init__(self, c=4, d=16, e=8, v=6):
        super().__init__()
        self.conv = StandInConv2d(c, d, 3, padding=1)
        self.to_k = StandInLinear(e, d)
        self.qkv = StandInLinear(d, 3 * d)  # a fused projection, patched through `offset` slices
        self.vec = StandInLinear(v, d)
        self.out = StandInLinear(d, c)

    def forward(self, x, t, context, y=None):
        h = self.conv(x).flatten(2).transpose(1, 2)  # B, HW, d
        q, k, v = self.qkv(torch.tanh(h)).chunk(3, -1)
        ctx = self.to_k(context)  # B, L, d
        attn = torch.softmax(q @ ctx.transpose(1, 2) / 4, -1) @ ctx
        h = h + attn + k * torch.tanh(v)
        if y is not None:
            h = h + self.vec(y)[:, None]
        out = self.out(torch.tanh(h)).transpose(1, 2).reshape(x.shape)
        return x - out * t.reshape(-1, 1, 1, 1).clamp(max=2)


class StandInKModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.diffusion_model = TinyNet()
        self.lora_loader = SimpleNamespace(backup={})
        self.calls = 0

    def apply_model(self, x, t, c_crossattn=None, y=None, transformer_options=None, guidance=None, **kwargs):
        assert not set(OUR_KEYS) & set(kwargs), "AutoLoRA's extra model_conds must not reach the model"
        self.calls += 1
        out = self.diffusion_model(x, t, c_crossattn, y)
        if guidance is not None:  # a guidance-distilled model (Flux) reads the distilled CFG scale
            out = out * (1 + 0.1 * guidance.reshape(-1, 1, 1, 1))
        return out

    def memory_required(self, shape):
        return 0


def lora_patch(shape, rank, seed, strength=1.0, alpha=2.0, offset=None, function=None, conv=False):
    g = torch.Generator().manual_seed(seed)
    out_f = shape[0] if offset is None else offset[2]
    up = torch.randn(out_f, rank, *((1, 1) if conv else ()), generator=g) * 0.4
    down = torch.randn(rank, *shape[1:], generator=g) * 0.4
    return [strength, ("lora", (up, down, torch.tensor(alpha), None, None)), 1.0, offset, function]


def forge_lora_patches(model, guided_seed=1, other_seed=2, nonlinear=False):
    """Two LoRAs in Forge's lora_patches layout: A (guided) and B (kept in both branches)."""
    dm = model.diffusion_model
    d = dm.qkv.weight.shape[1]
    a = {
        "diffusion_model.conv.weight": [lora_patch(tuple(dm.conv.weight.shape), 2, guided_seed, conv=True)],
        "diffusion_model.to_k.weight": [lora_patch(tuple(dm.to_k.weight.shape), 3, guided_seed + 10)],
        "diffusion_model.qkv.weight": [lora_patch((d, d), 2, guided_seed + 20, offset=(0, 0, d)),
                                       lora_patch((d, d), 2, guided_seed + 21, offset=(0, 2 * d, d))],
        "diffusion_model.vec.weight": [lora_patch(tuple(dm.vec.weight.shape), 2, guided_seed + 30)],
        "diffusion_model.out.weight": [lora_patch(tuple(dm.out.weight.shape), 2, guided_seed + 40,
                                                  function=(lambda w: w * 1.5) if nonlinear else None)],
    }
    b = {"diffusion_model.to_k.weight": [lora_patch(tuple(dm.to_k.weight.shape), 2, other_seed, strength=0.7)],
         "diffusion_model.out.weight": [lora_patch(tuple(dm.out.weight.shape), 2, other_seed + 1, strength=0.7)]}
    return {("A.safetensors", 1.0, 1.0, False): a, ("B.safetensors", 0.7, 1.0, False): b}


def merge_offline(model, lora_patches, only=None):
    """LoraLoader.refresh in offline mode: originals to `backup`, merged weights as new Parameters."""
    merged = {}
    for (filename, *_), patches in lora_patches.items():
        if only is not None and filename not in only:
            continue
        for key, entries in patches.items():
            merged.setdefault(key, []).extend(entries)
    for key, entries in merged.items():
        path, _, attr = key.rpartition(".")
        module = model.get_submodule(path)
        original = getattr(module, attr)
        model.lora_loader.backup[key] = original
        setattr(module, attr, torch.nn.Parameter(standin_merge_lora_to_weight(entries, original, key), requires_grad=False))


def standin_api(max_entries=99):
    return SimpleNamespace(
        calc_cond_uncond_batch=lambda *a: standin_calc_cond_uncond_batch(*a, max_entries=max_entries),
        compute_cond_mark=standin_compute_cond_mark, compute_cond_indices=standin_compute_cond_indices,
        compile_conditions=standin_compile_conditions,
        compile_weighted_conditions=standin_compile_weighted_conditions,
        Condition=StandInCondition, ConditionCrossAttn=StandInConditionCrossAttn,
        reconstruct_multicond_batch=standin_reconstruct_multicond_batch,
        reconstruct_cond_batch=standin_reconstruct_cond_batch,
        merge_lora_to_weight=standin_merge_lora_to_weight,
        options=lambda: SimpleNamespace(autolora_default_strategy="auto", autolora_swap_budget_mb=0),
        lean_memory=lambda: False, free_memory=lambda device: 2 ** 40,
        merge_for=lambda patcher: standin_merge_lora_to_weight, step_hook="sampler_pre_cfg_function",
        corrects_last_noise_uncond=True, unsupported=lambda p: None)


class StandInForgeModelPatcher:
    """backend/patcher/base.py ModelPatcher of Forge main: `lora_patches` keyed by file, the model's
    `lora_loader` (created on first use) keeping the originals in `backup`; clones copy the dict."""

    def __init__(self, model, load_device, offload_device, size=0, current_device=None, **kwargs):
        self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
        self.lora_patches = {}
        self.model_options = {"transformer_options": {}}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = SimpleNamespace(backup={}, online_backup=[], loaded_hash=str([]))
        self.lora_loader = model.lora_loader

    def clone(self):
        n = StandInForgeModelPatcher(self.model, self.load_device, self.offload_device, self.size)
        n.lora_patches = self.lora_patches.copy()
        return n


# -- modules/prompt_parser.py: the conditioning the host caches per prompt, and its per-step picks ----

class StandInScheduledPromptConditioning:
    def __init__(self, end_at_step, cond):
        self.end_at_step, self.cond = end_at_step, cond


class StandInComposable:  # ComposableScheduledPromptConditioning
    def __init__(self, schedules, weight=1.0):
        self.schedules, self.weight = schedules, weight


class StandInMulticond:  # MulticondLearnedConditioning
    def __init__(self, shape, batch):
        self.shape, self.batch = shape, batch


def _pick(schedules, step):
    for current, entry in enumerate(schedules):
        if step <= entry.end_at_step:
            return entry.cond
    return schedules[0].cond


def _stack(rows):
    if isinstance(rows[0], dict):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    return torch.stack(rows)


def standin_reconstruct_cond_batch(c, current_step):
    """reconstruct_cond_batch: each prompt's schedule entry for the step, stacked."""
    return _stack([_pick(schedules, current_step) for schedules in c])


def standin_reconstruct_multicond_batch(c, current_step):
    """reconstruct_multicond_batch: (conds_list of (row, weight) per image, the stacked rows)."""
    rows, conds_list = [], []
    for composables in c.batch:
        conds_list.append([(len(rows) + i, composable.weight) for i, composable in enumerate(composables)])
        rows += [_pick(composable.schedules, current_step) for composable in composables]
    return conds_list, _stack(rows)


def schedules_of(cond, uncond, composition, ends=(1000,)):
    """Stacked rows -> the host's cached conditioning: a MulticondLearnedConditioning whose image i
    has the (row, weight) sub-prompts of composition[i], each scheduled as `ends` (one row per
    schedule entry: prompt editing), and the uncond's schedules."""
    def row(t, i):
        return {k: v[i] for k, v in t.items()} if isinstance(t, dict) else t[i]

    def schedule(t, first):
        return [StandInScheduledPromptConditioning(end, row(t, first + k)) for k, end in enumerate(ends)]

    stride = len(ends)
    batch = [[StandInComposable(schedule(cond, r * stride), w) for r, w in image] for image in composition]
    n = (uncond["crossattn"] if isinstance(uncond, dict) else uncond).shape[0] // stride
    return StandInMulticond((len(composition),), batch), [schedule(uncond, i * stride) for i in range(n)]
