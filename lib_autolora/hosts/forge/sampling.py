"""One Forge sampling pass with AutoLoRA: a patch on a clone of the UNet patcher, through the model
options the host's sampling step (backend/sampling/sampling_function.py) reads.

One guided step of the host's `sampling_function_inner`:

    pre-CFG function  is the step guided (step.begin)? base twins of the step's condition entries
                      (the same entries with the base branch's text); per-step model options
    calc (the host's) the LoRA branch, as the host evaluates it (the wrapper adds the LoRA scale)
    CFG function      the base branch: the host's calc on the twins; then step.guide -> the output

A step that is not guided changes nothing. The host's calc is used for both branches, so areas,
masks, ControlNet, its memory-based batching and transformer patches apply to both; fused.py lets
the base rows ride in the LoRA pass's forward. Post-CFG functions of the model (perturbed
attention, self-attention guidance) run after the blend and see the LoRA branch, as without
AutoLoRA; those a sampler brings for its own bookkeeping (Forge Neo's CFG++ samplers; they arrive
in the sampler's model options, not on the UNet patcher) see the sampled model's predictions
(step.sampled), and so does DDIM CFG++'s `last_noise_uncond`, moved after each guided step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ... import step as step_protocol
from ...generation import Generation
from ...step import StepPosition
from ..adapter import model_changed, open_strategy
from .factors import base_weight
from .fused import Fusion, strip
from .patcher import applied_per_call, originals

HOOK_MARK = "_autolora"  # on the functions AutoLoRA puts into model_options


def _uncond_dropped(args: dict) -> bool:
    """The host's CFG-1 rule (its sampling function): at scale 1 it evaluates no uncond."""
    return math.isclose(args["cond_scale"], 1.0) and not args["model_options"].get("disable_cfg1_optimization", False)


def schedule_position(conds, step: int) -> tuple:
    """Which prompt of each prompt schedule the host's reconstruct_(multi)cond_batch takes at
    `step` (modules/prompt_parser.py: the first whose end_at_step is at or after it), for a
    MulticondLearnedConditioning or for a list of schedules; equal positions, equal conditioning."""
    schedules = ([composable.schedules for prompts in conds.batch for composable in prompts]
                 if hasattr(conds, "batch") else list(conds))
    return tuple(next((i for i, entry in enumerate(schedule) if step <= entry.end_at_step), 0)
                 for schedule in schedules)


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


@dataclass
class Step:
    at: StepPosition
    lora: tuple  # (cond entries, uncond entries or None) the host evaluates
    base: tuple  # their base twins
    fused: bool  # the base rows ride in the LoRA pass (fused.py)
    phase: str = "lora"  # lora -> base -> closed
    stash: dict = field(default_factory=dict)  # entry tag -> base rows computed in the LoRA pass
    # (base cond, LoRA cond, base uncond, LoRA uncond) of a step with an uncond pass, and its sigma:
    # what the sampled model's predictions are derived from, when a sampler asks
    predictions: Optional[tuple] = None
    sigma: Optional[torch.Tensor] = None


class Sampling:
    """One sampling pass (first or hires) of a generation. Its hooks are plain closures, since the
    host deep-copies model_options whenever a patcher is cloned."""

    def __init__(self, api, gen: Generation, p, unet, guided, conds: dict, fused: bool = True):
        self.api, self.gen, self.p, self.unet, self.guided = api, gen, p, unet, guided  # guided: ForgeFactors
        self.conds = conds  # base_c, base_uc, lora_c, lora_uc (None = the host's own)
        self.model = unet.model
        self.fusion = Fusion(api, self.note) if fused else None  # both branches in one forward
        self.compiled = {}  # (branch, c/uc, prompt schedule position) -> compiled text entries
        self.closed = False
        self.last_guided: Optional[Step] = None  # until the CFG denoiser's after-CFG callback

    def note(self, text: str) -> None:
        self.gen.note(text, getattr(self.p, "comment", None))

    def fail(self, exc: BaseException, step: Optional[Step] = None) -> None:
        denoiser = getattr(getattr(self.p, "sampler", None), "model_wrap_cfg", None)
        index = step.at.index if step is not None else int(getattr(denoiser, "step", 0) or 0)
        self.gen.fail(exc, index, getattr(self.p, "comment", None))

    def close(self):
        self.gen.close_strategy()
        # The host's memory manager may keep the patcher clone (and with it our closures) in its list
        # of loaded models after the generation: let them hold nothing heavy (factors, conds, `p`).
        self.closed = True
        self.guided = self.p = self.unet = self.model = self.fusion = None
        self.conds = {}
        self.compiled = {}
        self.last_guided = None

    # -- the step function: which steps are guided, and with what -----------------------------------
    def step_function(self, hook: str):
        """Our function for the host's model-options list `hook`: the pre-CFG list (Forge main, Forge
        Neo), or the conditioning modifiers (reForge, Forge Classic)."""
        function = self.pre_cfg_function() if hook == "sampler_pre_cfg_function" else self.conditioning_modifier()
        setattr(function, HOOK_MARK, True)
        return function

    def pre_cfg_function(self):
        def pre_cfg(model, cond, uncond, x, timestep, model_options):
            step = self._begin(model, cond, uncond, x)
            if step is None:
                return model, cond, uncond, x, timestep, model_options
            return (model, *step.lora, x, timestep, self._step_options(step, model_options))

        return pre_cfg

    def conditioning_modifier(self):
        """As the pre-CFG function, one hook earlier: before the host drops the uncond (CFG 1, a
        skipped step), which the CFG function then learns from the step's CFG scale."""
        def modifier(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
            step = self._begin(model, cond, uncond, x)
            if step is None:
                return model, x, timestep, uncond, cond, cond_scale, model_options, seed
            return model, x, timestep, step.lora[1], step.lora[0], cond_scale, self._step_options(step, model_options), seed

        return modifier

    def _begin(self, model, cond, uncond, x) -> Optional[Step]:
        try:
            return self.begin_step(model, cond, uncond, x)
        except Exception as exc:  # never the WebUI's error: the host's plain step instead
            self.fail(exc)
            return None

    def _step_options(self, step: Step, model_options: dict) -> dict:
        """A copy of the step's model options with our CFG function and model function wrapper, each
        wrapping what was there, and the sampler's post-CFG functions seeing the sampled model."""
        options = dict(model_options)
        options["sampler_cfg_function"] = self.cfg_function(step, model_options.get("sampler_cfg_function"))
        options["model_function_wrapper"] = self.wrapper(step, model_options.get("model_function_wrapper"))
        if model_options.get("sampler_post_cfg_function"):
            options["sampler_post_cfg_function"] = self.post_cfg_functions(step, model_options["sampler_post_cfg_function"])
        return options

    def begin_step(self, model, cond, uncond, x) -> Optional[Step]:
        gen = self.gen
        if gen.stopped or self.closed:
            return None
        if model is not self.model:
            model_changed(gen, getattr(self.p, "comment", None))
            return None
        denoiser = getattr(getattr(self.p, "sampler", None), "model_wrap_cfg", None)
        at = step_protocol.begin(gen, int(getattr(denoiser, "step", 0) or 0),
                                 int(getattr(denoiser, "total_steps", 0) or 0))
        if at is None:
            return None
        lora, base = self._branch_entries("lora", cond, uncond, at), self._branch_entries("base", cond, uncond, at)
        if lora is None or base is None:
            self.note("AutoLoRA: the conditioning changed during sampling (another extension?); "
                      "those steps run without AutoLoRA")
            return None
        if gen.strategy is None:
            self._open_strategy(x)
        fused = self.fusion is not None and gen.strategy.fuses_branches and not self._context_windows(x)
        if fused:
            (lora_c, lora_u), (base_c, base_u) = lora, base
            lora_c, base_c = self.fusion.tag(lora_c, base_c, 0)
            if uncond is not None:
                lora_u, base_u = self.fusion.tag(lora_u, base_u, len(cond))
            lora, base = (lora_c, lora_u), (base_c, base_u)
        return Step(at, lora, base, fused)

    def _branch_entries(self, branch: str, cond: list, uncond: Optional[list], at: StepPosition) -> Optional[tuple]:
        """The step's (cond, uncond) entries with `branch`'s text (the host's own where it has none);
        None when the host's entries do not match them one to one."""
        text_c = self._text(branch, "c", at.index) or cond
        text_u = (self._text(branch, "uc", at.index) or uncond) if uncond is not None else None
        if len(text_c) != len(cond) or (uncond is not None and len(text_u) != len(uncond)):
            return None

        def twins(entries, texts):
            return None if entries is None else [e if t is e else _twin(e, t) for e, t in zip(entries, texts)]

        return twins(cond, text_c), twins(uncond, text_u)

    def _text(self, branch: str, which: str, index: int) -> Optional[list]:
        """`branch`'s compiled text entries at step `index`, compiled again only when the prompt
        schedule moves to another prompt (the host's compile indexes device tensors with a list, a
        blocking copy), or None where the host's own serve."""
        conds = self.conds.get(f"{branch}_{which}")
        if conds is None:
            return None
        key = (branch, which, schedule_position(conds, index))
        entries = self.compiled.get(key)
        if entries is None:
            api = self.api
            if which == "c":
                composition, tensors = api.reconstruct_multicond_batch(conds, index)
                entries = api.compile_weighted_conditions(tensors, composition)
            else:
                entries = api.compile_conditions(api.reconstruct_cond_batch(conds, index))
            self.compiled[key] = entries
        return entries

    def _open_strategy(self, x: torch.Tensor):
        """At the first guided step: the host has loaded and merged the model by then."""
        api, guided = self.api, self.guided
        original = originals(self.unet)
        # Whether every guided layer holds its merged weight (online LoRAs and low-VRAM layers get
        # their patches applied in each forward): known only now that the host loaded the model.
        merged = not guided.online and not any(applied_per_call(module) for module in guided.factors.nonzero())
        open_strategy(
            self.gen, api.options(), guided.factors, self.p, weights_merged=merged, lean_memory=api.lean_memory(),
            latent_pixels_per_branch=int(x.shape[0] * x.shape[-1] * x.shape[-2]), free_bytes=api.free_memory(x.device),
            # Exact: the host's pre-LoRA original with the unguided LoRAs merged back.
            base_weights=lambda module, _delta: (
                base_weight(guided.params[module], merge=api.merge_for(self.unet), original=original), None))

    # -- the model function wrapper: what each host forward of the step runs ------------------------
    def wrapper(self, step: Step, previous):
        def call(apply_model, x, t, c, cond_or_uncond):
            if previous is not None:
                return previous(apply_model, {"input": x, "timestep": t, "c": c, "cond_or_uncond": cond_or_uncond})
            return apply_model(x, t, **c)

        def wrapped(apply_model, args):
            x, t, cou = args["input"], args["timestep"], args["cond_or_uncond"]
            c, ours = strip(args["c"])
            strategy = self.gen.strategy

            def forward(x_, t_, c_):
                return call(apply_model, x_, t_, c_, cou)

            if strategy is None or self.gen.stopped or step.phase == "closed":
                return forward(x, t, c)  # AutoLoRA failed in this step, or a later call (perturbed attention)
            if step.phase == "base":
                replayed = self.fusion.replay(step.stash, x, ours, cou) if step.fused else None
                return replayed if replayed is not None else strategy.evaluate_base(forward, (x, t, c))
            if step.fused:
                try:
                    out = self.fusion.forward(step.stash, strategy, call, apply_model, args, dict(c), ours)
                except Exception as exc:  # the host's plain forward instead; the CFG function sees it
                    self.fail(exc, step)
                    return forward(x, t, c)
                if out is not None:
                    return out
            return strategy.lora_forward(forward, (x, t, c)) if strategy.lora_scale != 1.0 else forward(x, t, c)

        return wrapped

    # -- the CFG function: the base branch and the step's output --------------------------------------
    def cfg_function(self, step: Step, previous):
        def cfg_of(args, x, cond, uncond, scale):
            """The CFG the host computes for one branch (sampling_function_inner)."""
            if previous is not None:
                return x - previous({**args, "cond": x - cond, "uncond": x - uncond, "cond_scale": scale,
                                     "cond_denoised": cond, "uncond_denoised": uncond})
            edit_strength = sum(e.get("strength", 1) for e in step.lora[0])
            if not math.isclose(edit_strength, 1.0):
                return uncond + (cond - uncond) * scale * edit_strength
            return uncond + (cond - uncond) * scale

        def cfg(args):
            x, lora_c, lora_u = args["input"], args["cond_denoised"], args["uncond_denoised"]
            if _uncond_dropped(args):  # at CFG 1 the host evaluated no uncond after our hook ran
                step.lora, step.base = (step.lora[0], None), (step.base[0], None)
            if not self.gen.stopped:
                try:
                    return x - self._guided(step, args, lambda pred, scale: cfg_of(args, x, *pred, scale))
                except Exception as exc:
                    self.fail(exc, step)
            return x - cfg_of(args, x, lora_c, lora_u, args["cond_scale"])  # the host's own step

        return cfg

    def _guided(self, step: Step, args: dict, combine) -> torch.Tensor:
        step.phase = "base"
        try:
            base = self.fusion.predictions(step.stash, *step.base, args["input"]) if step.fused else None
            if base is None:  # the host's own pass over the base twins
                base = self.calc_base(args["model"], *step.base, args["input"], args["timestep"],
                                      args["model_options"])
        finally:
            step.phase = "closed"
            step.stash.clear()
        base_c, base_u = base
        lora_c, lora_u = args["cond_denoised"], args["uncond_denoised"]
        # CFG 1, skip-early-CFG steps, Flux: no uncond pass (the host's uncond prediction is zero),
        # so each branch is its cond prediction: the two-evaluation variant.
        has_uncond = step.lora[1] is not None and step.base[1] is not None
        if has_uncond:
            step.predictions, step.sigma = (base_c, lora_c, base_u, lora_u), args["sigma"]
            self.last_guided = step
        return step_protocol.guide(self.gen, step.at, (lora_c, lora_u), (base_c, base_u), combine,
                                   args["cond_scale"], uncond_evaluated=has_uncond,
                                   lora_uncond=lora_u if has_uncond else None)

    def calc_base(self, model, cond, uncond, x, timestep, model_options):
        """The base branch through the host's `calc_cond_uncond_batch`, or through its context
        windows when the host evaluates this step's conds that way (Forge Neo 2.x)."""
        if self._context_windows(x):
            return self._context_handler().execute(self.api.calc_cond_uncond_batch, model, [cond, uncond], x,
                                                   timestep, model_options)
        return self.api.calc_cond_uncond_batch(model, cond, uncond, x, timestep, model_options)

    def _context_handler(self):
        find = getattr(self.api, "context_handler", None)
        return find() if find is not None else None

    def _context_windows(self, x) -> bool:
        handler = self._context_handler()
        return handler is not None and bool(getattr(handler, "should_use_context", lambda *a: False)(x))

    # -- what samplers read after the step (CFG++) ------------------------------------------------------
    def sampled_prediction(self, step: Step, uncond: bool) -> torch.Tensor:
        base, lora = step.predictions[2:] if uncond else step.predictions[:2]
        return step_protocol.sampled(step.at, base, lora)

    def post_cfg_functions(self, step: Step, functions: list) -> list:
        """`functions` with each one the sampler brought (not on the UNet patcher) seeing the sampled
        model's predictions; the model's own (on the patcher) are left as they are."""
        # The patcher the host samples with now: extensions that run after AutoLoRA's hook (perturbed
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

    def correct_last_noise_uncond(self, denoiser) -> None:
        """DDIM CFG++ (a timesteps sampler) renoises with `denoiser.last_noise_uncond`, which the
        host's CFGDenoiser computes as (x - uncond_pred) / sigma from the LoRA branch's uncond
        prediction after the step: it is moved to the sampled model's. Runs from the after-CFG
        callback, once per step; a step AutoLoRA did not guide is left alone."""
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
