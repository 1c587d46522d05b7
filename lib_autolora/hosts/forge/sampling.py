"""One Forge sampling pass with AutoLoRA: the closures that bind a `Generation` to Forge's
sampling hooks (backend/sampling/sampling_function.py).

Why these model_options hooks (Forge main has no `sampler_calc_cond_uncond_batch_function`):
- `sampler_pre_cfg_function` is the only hook that sees a step's condition lists. Ours is appended
  (nothing is replaced); it decides whether the step is guided and, if so, returns a per-step copy
  of model_options carrying the two hooks below. An unguided step returns everything unchanged:
  zero extra work.
- `sampler_cfg_function` receives the LoRA branch's cond/uncond predictions; it runs the base
  branch (Forge's own `calc_cond_uncond_batch`: areas, masks, ControlNet, its memory-based
  batching, transformer patches) on twin condition entries that differ from the LoRA ones only in
  their text conditioning, and returns the AutoLoRA blend. A cfg function set by another extension
  (dynamic thresholding) is not overwritten but applied to each branch's CFG (w2 for the LoRA
  branch, w1 for the base branch) before the blend, whatever order the scripts ran in.
- `model_function_wrapper` (chained to any existing one) sets the hooks' row plan around each UNet
  call. With `batched` the base rows ride in the LoRA pass's forward (the twins' text conditioning
  travels in extra model_conds) and are replayed when Forge accumulates the base branch: one
  forward for both branches. `sequential` runs the base rows as a second forward; `swap`/`dual`
  run them over the exact LoRA-free weights (Forge's own backup, unguided LoRAs merged back).

Post-CFG functions of the model (perturbed attention, self-attention guidance) run after the
blend and see the LoRA branch, as without AutoLoRA: they re-run the LoRA model and compare with its
own predictions. Post-CFG functions a sampler brings for its own use (Forge Neo's CFG++ samplers
renoise with the unconditional prediction; they arrive in the sampler's model options, not on the
UNet patcher) see the predictions of the model AutoLoRA samples (`Generation.sampled_prediction`),
so that γ 1 is the LoRA's sampler and γ 0 the base model's; DDIM CFG++ reads the same from the
CFG denoiser's `last_noise_uncond`, corrected after each guided step. Block patches (FreeU) apply
to both branches.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ... import step as step_protocol
from ...generation import Generation
from ...step import StepPosition
from .factors import base_weight
from .patcher import applied_per_call, originals

TWIN_CROSSATTN = "autolora_base_c_crossattn"
TWIN_Y = "autolora_base_y"
TAG = "autolora_entry"
OUR_KEYS = (TWIN_CROSSATTN, TWIN_Y, TAG)
OUR_MARK = "_autolora"  # attribute on the functions AutoLoRA puts into model_options


@functools.lru_cache(maxsize=None)
def resident_condition(condition_cls):
    """A subclass of the host's Condition whose tensor stays on its own device (the CPU) when Forge
    moves a batch's conditions to the GPU: reading our row tags back then needs no device sync,
    which would stall the GPU once per step (a host-to-device copy of pageable memory, or a
    device-to-host read)."""

    class ResidentCondition(condition_cls):
        def process_cond(self, batch_size, device, **kwargs):
            return super().process_cond(batch_size, self.cond.device, **kwargs)

    return ResidentCondition


def _twin(entry: dict, text: dict) -> dict:
    """A copy of a condition entry with the text conditioning of `text` (an entry compiled from
    other text); everything else (c_concat, control, area, strength, guidance) stays."""
    out = dict(entry)
    model_conds = dict(entry["model_conds"])
    model_conds["c_crossattn"] = text["model_conds"]["c_crossattn"]
    out["cross_attn"] = text.get("cross_attn", entry.get("cross_attn"))
    if "y" in text["model_conds"] and "y" in model_conds:
        model_conds["y"] = text["model_conds"]["y"]
        out["pooled_output"] = text.get("pooled_output", entry.get("pooled_output"))
    out["model_conds"] = model_conds
    return out


def _strip(c: dict) -> tuple[dict, dict]:
    c = dict(c)
    return c, {k: c.pop(k) for k in OUR_KEYS if k in c}


@dataclass
class Step:
    lora_cond: list
    lora_uncond: Optional[list]
    base_cond: list
    base_uncond: Optional[list]
    fused: bool  # base rows ride in the LoRA pass (batched strategy)
    at: StepPosition
    phase: str = "lora"  # lora -> base -> closed
    stash: dict = field(default_factory=dict)  # entry tag -> base rows computed in the LoRA pass
    # (base cond, LoRA cond, base uncond, LoRA uncond) predictions of a guided step with an uncond
    # pass, and its sigma: what the sampled model's predictions are derived from, when a sampler asks
    predictions: Optional[tuple] = None
    sigma: Optional[torch.Tensor] = None


class Sampling:
    """One sampling pass (first pass or hires pass) of a generation: factors, conditionings, the
    closures that go into the UNet patcher's model_options. They are plain functions, since Forge
    deep-copies model_options whenever a patcher is cloned."""

    def __init__(self, api, gen: Generation, p, unet, ff, conds: dict):
        self.api, self.gen, self.p, self.unet, self.ff = api, gen, p, unet, ff
        self.settings = gen.settings
        self.conds = conds  # base_c, base_uc, lora_c, lora_uc (None = Forge's own)
        self.model = unet.model
        self.closed = False
        self.fits = {}  # input shape -> both branches fit in memory in one forward
        self.marks = {}  # doubled layout -> Forge's cond_mark and indices for it (_doubled_marks)
        self.last_guided: Optional[Step] = None  # until the CFG denoiser's after-CFG callback

    @property
    def strategy(self):
        return self.gen.strategy

    def note(self, text: str) -> None:
        self.gen.note(text, getattr(self.p, "comment", None))

    # -- strategy, entered at the first guided step (the UNet is loaded and merged by then) ------
    def _open_strategy(self, x: torch.Tensor):
        api, opts = self.api, self.api.options()
        budget_mb = getattr(opts, "autolora_swap_budget_mb", 0) or 0
        original = originals(self.unet)
        ff = self.ff
        # Known only now that the host loaded the model: whether every guided layer holds its merged
        # weight (online LoRAs and low-VRAM layers get their patches applied in each forward).
        merged = not ff.online and not any(applied_per_call(module) for module in ff.factors.nonzero())
        self.gen.open_strategy(
            ff.factors, default=getattr(opts, "autolora_default_strategy", "auto"), weights_merged=merged,
            lean_memory=api.lean_memory(), latent_pixels_per_branch=int(x.shape[0] * x.shape[-1] * x.shape[-2]),
            free_bytes=api.free_memory(x.device), swap_budget_bytes=int(budget_mb * 2 ** 20) if budget_mb else None,
            # Exact: the host's pre-LoRA original with the unguided LoRAs merged back.
            base_weights=lambda module, _delta: (
                base_weight(ff.params[module], merge=api.merge_lora_to_weight, original=original), None),
            comment=getattr(self.p, "comment", None))

    def fail(self, exc: BaseException, step: Optional[Step] = None) -> None:
        index = step.at.index if step is not None else int(getattr(getattr(getattr(self.p, "sampler", None),
                                                                         "model_wrap_cfg", None), "step", 0) or 0)
        self.gen.fail(exc, index, getattr(self.p, "comment", None))

    def calc_base(self, model, cond, uncond, x, timestep, model_options):
        """The base branch through the host's `calc_cond_uncond_batch`, or through its context
        windows when the host evaluates this step's conds that way (Forge Neo 2.x)."""
        handler = self.context_handler()
        if handler is not None and getattr(handler, "should_use_context", lambda *a: False)(x):
            return handler.execute(self.api.calc_cond_uncond_batch, model, [cond, uncond], x, timestep, model_options)
        return self.api.calc_cond_uncond_batch(model, cond, uncond, x, timestep, model_options)

    def context_handler(self):
        find = getattr(self.api, "context_handler", None)
        return find() if find is not None else None

    def close(self):
        self.gen.close_strategy()
        # Forge's memory manager may keep the patcher clone (and with it our closures) in its list of
        # loaded models after the generation: let them hold nothing heavy (factors, conds, `p`).
        self.closed = True
        self.ff = self.p = self.unet = self.model = None
        self.conds = {}
        self.marks = {}
        self.last_guided = None

    def sampled_prediction(self, step: Step, uncond: bool) -> torch.Tensor:
        """The sampled model's cond or uncond prediction at a guided step with an uncond pass
        (`Generation.sampled_prediction`); computed only for the samplers that read it."""
        base, lora = step.predictions[2:] if uncond else step.predictions[:2]
        return step_protocol.sampled(step.at, base, lora)

    def correct_last_noise_uncond(self, denoiser) -> None:
        """DDIM CFG++ (a timesteps sampler) renoises with `denoiser.last_noise_uncond`, which Forge's
        CFGDenoiser computes as (x - uncond_pred) / sigma from the LoRA branch's uncond prediction
        after the step: it is moved to the sampled model's. Runs from the after-CFG callback, once
        per step; a step AutoLoRA did not guide is left alone."""
        step, self.last_guided = self.last_guided, None
        current = getattr(denoiser, "last_noise_uncond", None)
        if step is None or current is None or not getattr(denoiser, "need_last_noise_uncond", False):
            return
        lora_u = step.predictions[3]
        if lora_u.shape != current.shape:
            return
        shift = (lora_u - self.sampled_prediction(step, uncond=True)) / step.sigma.reshape(
            -1, *([1] * (lora_u.dim() - 1)))
        denoiser.last_noise_uncond = current + shift.to(current.dtype)

    # -- sampler_pre_cfg_function ---------------------------------------------------------------
    def begin_step(self, model, cond, uncond, x) -> Optional[Step]:
        gen, api = self.gen, self.api
        if gen.stopped or self.closed:
            return None
        if model is not self.model:
            gen.stopped = "model changed"
            self.note("AutoLoRA: the model changed during sampling (refiner); the rest runs without AutoLoRA")
            return None
        denoiser = getattr(getattr(self.p, "sampler", None), "model_wrap_cfg", None)
        call = int(getattr(denoiser, "step", 0) or 0)
        calls = int(getattr(denoiser, "total_steps", 0) or 0)
        at = step_protocol.begin(gen, call, calls)
        if at is None:
            return None
        text = {}
        for branch in ("base", "lora"):
            c, uc = self.conds.get(f"{branch}_c"), self.conds.get(f"{branch}_uc")
            entries_c, entries_uc = cond, uncond
            if c is not None:
                composition, tensors = api.reconstruct_multicond_batch(c, call)
                entries_c = api.compile_weighted_conditions(tensors, composition)
            if uncond is not None and uc is not None:
                entries_uc = api.compile_conditions(api.reconstruct_cond_batch(uc, call))
            if len(entries_c) != len(cond) or (uncond is not None and len(entries_uc) != len(uncond)):
                self.note("AutoLoRA: the conditioning changed during sampling (another extension?); "
                          "those steps run without AutoLoRA")
                return None
            text[branch] = (entries_c, entries_uc)

        def twins(entries, texts):
            return None if entries is None else [e if t is e else _twin(e, t) for e, t in zip(entries, texts)]

        lora_cond, lora_uncond = twins(cond, text["lora"][0]), twins(uncond, text["lora"][1])
        base_cond, base_uncond = twins(cond, text["base"][0]), twins(uncond, text["base"][1])
        if self.strategy is None:
            self._open_strategy(x)
        handler = self.context_handler()
        # Context windows run the conds window by window: the base rows cannot ride along.
        fused = self.strategy.fuses_branches and not (
            handler is not None and getattr(handler, "should_use_context", lambda *a: False)(x))
        if fused:
            lora_cond, base_cond = self._tag(lora_cond, base_cond, 0)
            if uncond is not None:
                lora_uncond, base_uncond = self._tag(lora_uncond, base_uncond, len(cond))
        return Step(lora_cond, lora_uncond, base_cond, base_uncond, fused, at)

    def _tag(self, lora_entries, base_entries, first):
        """Give each LoRA entry its base twin's text conditioning, and both a shared tag, so the
        wrapper can run the twin's rows in the same forward and replay them by tag."""
        lora_out, base_out = [], []
        for i, (lora, base) in enumerate(zip(lora_entries, base_entries)):
            tag = resident_condition(self.api.Condition)(torch.full((1, 1), float(first + i)))
            lm, bm = dict(lora["model_conds"]), dict(base["model_conds"])
            lm[TWIN_CROSSATTN] = self.api.ConditionCrossAttn(bm["c_crossattn"].cond)
            if "y" in lm and "y" in bm:
                lm[TWIN_Y] = self.api.Condition(bm["y"].cond)
            lm[TAG] = bm[TAG] = tag
            lora_out.append({**lora, "model_conds": lm})
            base_out.append({**base, "model_conds": bm})
        return lora_out, base_out

    # -- model_function_wrapper -----------------------------------------------------------------
    def wrapper(self, step: Step, previous):
        def call(apply_model, x, t, c, cond_or_uncond):
            if previous is not None:
                return previous(apply_model, {"input": x, "timestep": t, "c": c, "cond_or_uncond": cond_or_uncond})
            return apply_model(x, t, **c)

        def doubled(to: dict, cond_or_uncond, sigmas):
            to = dict(to)
            both = list(cond_or_uncond) * 2
            to["cond_or_uncond"] = both
            to["cond_mark"], to["cond_indices"], to["uncond_indices"] = self._doubled_marks(both, sigmas)
            return to

        def wrapped(apply_model, args):
            x, t, cou = args["input"], args["timestep"], args["cond_or_uncond"]
            c, ours = _strip(args["c"])
            strategy = self.strategy

            def forward(x_, t_, c_):
                return call(apply_model, x_, t_, c_, cou)

            if strategy is None or self.gen.stopped:  # AutoLoRA failed earlier in this step
                return forward(x, t, c)
            if step.phase == "lora":
                if step.fused and TWIN_CROSSATTN in ours and self._can_fuse(apply_model, x, c):
                    to = c.pop("transformer_options", {})
                    base_c = dict(c, c_crossattn=ours[TWIN_CROSSATTN])
                    if TWIN_Y in ours:
                        base_c["y"] = ours[TWIN_Y]
                    to2 = doubled(to, cou, to.get("sigmas", t))

                    def forward2(x_, t_, c_):
                        return call(apply_model, x_, t_, dict(c_, transformer_options=to2), list(cou) * 2)

                    try:
                        lora_out, base_out = strategy.evaluate(forward2, (x, t, c), (x, t, base_c))
                    except Exception as exc:  # the host's plain forward instead; cfg sees gen.stopped
                        self.fail(exc, step)
                        return forward(x, t, c)
                    rows = x.shape[0] // max(len(cou), 1)
                    tags = ours[TAG].reshape(-1)
                    for k in range(len(cou)):
                        step.stash[int(tags[k * rows])] = base_out[k * rows:(k + 1) * rows]
                    return lora_out
                if strategy.lora_scale != 1.0:
                    return strategy.lora_forward(forward, (x, t, c))
                return forward(x, t, c)
            if step.phase == "base":
                if TAG in ours:
                    rows = x.shape[0] // max(len(cou), 1)
                    tags = [int(v) for v in ours[TAG].reshape(-1)[::rows]]
                    if all(tag in step.stash for tag in tags):
                        return torch.cat([step.stash.pop(tag) for tag in tags])
                return strategy.evaluate_base(forward, (x, t, c))
            return forward(x, t, c)  # later calls of this step (perturbed attention): the plain model

        return wrapped

    def _doubled_marks(self, both: list, sigmas) -> tuple:
        """Forge's cond_mark and cond/uncond indices for the doubled batch, made once per pass and
        layout: cond_mark is built on the CPU and copied to the GPU, and a blocking copy per step
        stalls the CPU until the GPU has caught up (bench/step_ops.py counts these)."""
        key = (tuple(both), tuple(sigmas.shape), sigmas.dtype, sigmas.device)
        marks = self.marks.get(key)
        if marks is None:
            marks = self.marks[key] = (self.api.compute_cond_mark(both, sigmas),
                                       *self.api.compute_cond_indices(both, sigmas))
        return marks

    def _can_fuse(self, apply_model, x, c) -> bool:
        """Whether both branches can run in one forward; the memory part is asked once per pass
        and batch size (the host's memory query is slow, and its answer does not change per step)."""
        if "control" in c or "control_model" in c:
            self.note("AutoLoRA: ControlNet is active, so the base branch runs as a separate forward "
                      "(its control is computed from the base conditioning)")
            return False
        if any(k != "transformer_options" and not isinstance(v, torch.Tensor) for k, v in c.items()):
            return False
        model = getattr(apply_model, "__self__", None)
        if model is not None and hasattr(model, "memory_required") and x.device.type != "cpu":
            key = tuple(x.shape)
            fits = self.fits.get(key)
            if fits is None:
                fits = self.fits[key] = model.memory_required([x.shape[0] * 2, *x.shape[1:]]) <= \
                    self.api.free_memory(x.device)
            if not fits:
                self.note("AutoLoRA: not enough free memory to batch both branches; "
                              "the base branch runs as a separate forward")
                return False
        return True

    # -- sampler_cfg_function -------------------------------------------------------------------
    def cfg_function(self, step: Step, previous):
        gen = self.gen

        def cfg_of(args, x, cond, uncond, scale, edit_strength):
            """The CFG Forge would compute for one branch (sampling_function_inner)."""
            if previous is not None:
                return x - previous({**args, "cond": x - cond, "uncond": x - uncond, "cond_scale": scale,
                                     "cond_denoised": cond, "uncond_denoised": uncond})
            if not math.isclose(edit_strength, 1.0):
                return uncond + (cond - uncond) * scale * edit_strength
            return uncond + (cond - uncond) * scale

        def cfg(args):
            x = args["input"]
            lora_c, lora_u = args["cond_denoised"], args["uncond_denoised"]
            if gen.stopped:  # failed earlier in this step: the host's own CFG of the LoRA branch
                return x - cfg_of(args, x, lora_c, lora_u, args["cond_scale"],
                                  sum(e.get("strength", 1) for e in step.lora_cond))
            try:
                return guided(args, x, lora_c, lora_u)
            except Exception as exc:
                self.fail(exc, step)
                return x - cfg_of(args, x, lora_c, lora_u, args["cond_scale"],
                                  sum(e.get("strength", 1) for e in step.lora_cond))

        def guided(args, x, lora_c, lora_u):
            step.phase = "base"
            try:
                base_c, base_u = self.calc_base(args["model"], step.base_cond, step.base_uncond, x,
                                                args["timestep"], args["model_options"])
            finally:
                step.phase = "closed"
                step.stash.clear()
            # CFG 1, skip-early-CFG steps, Flux: no uncond pass (its prediction is zero), so each
            # branch is what Forge computes for it: the two-evaluation variant.
            edit_strength = sum(e.get("strength", 1) for e in step.lora_cond)
            if step.lora_uncond is not None and step.base_uncond is not None:
                step.predictions, step.sigma = (base_c, lora_c, base_u, lora_u), args["sigma"]
                self.last_guided = step
            out = step_protocol.guide(
                gen, step.at, (lora_c, lora_u), (base_c, base_u),
                lambda pred, scale: cfg_of(args, x, pred[0], pred[1], scale, edit_strength), args["cond_scale"],
                uncond_evaluated=step.base_uncond is not None,
                lora_uncond=lora_u if step.lora_uncond is not None else None)
            return x - out

        return cfg

    def sampler_post_cfg_functions(self, step: Step, functions: list) -> list:
        """`functions` with each one the sampler brought (not on the UNet patcher) seeing the sampled
        model's predictions; the model's own (on the patcher) are left as they are."""
        # The patcher Forge samples with now: extensions that run after AutoLoRA's hook (perturbed
        # attention) clone the patcher again and add theirs there, not on ours.
        patcher = getattr(getattr(getattr(self.p, "sd_model", None), "forge_objects", None), "unet", self.unet)
        on_model = getattr(patcher, "model_options", {}).get("sampler_post_cfg_function", [])

        def sees_sampled_model(fn):
            def post_cfg(args):
                if step.predictions is not None:
                    args = {**args, "cond_denoised": self.sampled_prediction(step, uncond=False),
                            "uncond_denoised": self.sampled_prediction(step, uncond=True)}
                return fn(args)
            return post_cfg

        return [fn if any(fn is own for own in on_model) else sees_sampled_model(fn) for fn in functions]

    def pre_cfg_function(self):
        def pre_cfg(model, cond, uncond, x, timestep, model_options):
            try:
                step = self.begin_step(model, cond, uncond, x)
            except Exception as exc:  # never the WebUI's error: the host's plain step instead
                self.fail(exc)
                step = None
            if step is None:
                return model, cond, uncond, x, timestep, model_options
            options = dict(model_options)
            options["sampler_cfg_function"] = self.cfg_function(step, model_options.get("sampler_cfg_function"))
            options["model_function_wrapper"] = self.wrapper(step, model_options.get("model_function_wrapper"))
            if model_options.get("sampler_post_cfg_function"):
                options["sampler_post_cfg_function"] = self.sampler_post_cfg_functions(
                    step, model_options["sampler_post_cfg_function"])
            return model, step.lora_cond, step.lora_uncond, x, timestep, options

        setattr(pre_cfg, OUR_MARK, True)
        return pre_cfg


