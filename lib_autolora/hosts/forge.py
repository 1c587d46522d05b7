"""AutoLoRA on Stable Diffusion WebUI Forge: the core bound to Forge's sampling hooks.

The user's LoRAs stay exactly as Forge applies them (merged "offline", or on the fly "online"), so
the LoRA branch is Forge's own evaluation. The base branch (every guided LoRA removed, the
unguided ones kept) is built the Forge way:

- Base conditioning: each prompt batch Forge encodes (`p.get_conds_with_caching`, first pass and
  hires pass alike) is encoded once more by the same prompt function while hooks on the
  text-encoder layers subtract the guided LoRAs' terms, read from
  `forge_objects.clip.patcher.lora_patches`. `forge_objects_original.clip` would drop the unguided
  LoRAs too, and switching patchers re-merges the weights (loads them twice); the hooks do neither
  and work the same for online LoRAs.
- Base UNet evaluation: Forge's own `calc_cond_uncond_batch` (areas, masks, ControlNet, its
  memory-based batching, transformer patches such as FreeU), run on twin condition entries that
  differ from the LoRA ones only in their text conditioning.

Why these model_options hooks (Forge main has no `sampler_calc_cond_uncond_batch_function`):
- `sampler_pre_cfg_function` is the only hook that sees a step's condition lists. Ours is appended
  (nothing is replaced); it decides whether the step is guided and, if so, returns a per-step copy
  of model_options carrying the two hooks below. An unguided step returns everything unchanged:
  zero extra work.
- `sampler_cfg_function` receives the LoRA branch's cond/uncond predictions; it runs the base
  branch and returns the AutoLoRA blend. A cfg function set by another extension (dynamic
  thresholding) is not overwritten but applied to each branch's CFG (w2 for the LoRA branch, w1 for
  the base branch) before the blend, whatever order the scripts ran in.
- `model_function_wrapper` (chained to any existing one) sets the hooks' row plan around each UNet
  call: coef (s - 1) on LoRA rows for LoRA scale s, -1 on base rows. With `batched` the base rows
  ride in the LoRA pass's forward (the twins' text conditioning travels in extra model_conds) and
  are replayed when Forge accumulates the base branch: one forward for both branches. `sequential`
  runs the base rows as a second forward; `swap` runs it over the exact LoRA-free weights (Forge's
  own backup, unguided LoRAs merged back), swapped in by reference.

Post-CFG functions (perturbed attention) run after the blend and see the LoRA branch, as without
AutoLoRA; block patches (FreeU) apply to both branches. Forge's low-VRAM offloading keeps working:
the hooks act on layer outputs wherever the weights live, and the factors' size is reserved with
`add_extra_preserved_memory_during_sampling`.
"""
from __future__ import annotations

import functools
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..base_branch import DeltaHooks, StrategyUnavailable, choose_strategy, make_strategy
from ..guidance import GuidanceInterval, blend, resolve_cfg_scale
from ..params import AutoLoraSettings
from . import common
from .forge_factors import base_weight, read_factors

log = logging.getLogger("autolora")

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


class ForgeAPI:
    """The Forge functions the adapter calls, imported in one place (the tests pass stand-ins)."""

    def __init__(self):
        from backend import memory_management
        from backend.patcher.lora import merge_lora_to_weight
        from backend.sampling import condition, sampling_function
        from modules import prompt_parser

        self.calc_cond_uncond_batch = sampling_function.calc_cond_uncond_batch
        self.compute_cond_mark = sampling_function.compute_cond_mark
        self.compute_cond_indices = sampling_function.compute_cond_indices
        self.compile_conditions = condition.compile_conditions
        self.compile_weighted_conditions = condition.compile_weighted_conditions
        self.Condition = condition.Condition
        self.ConditionCrossAttn = condition.ConditionCrossAttn
        self.reconstruct_multicond_batch = prompt_parser.reconstruct_multicond_batch
        self.reconstruct_cond_batch = prompt_parser.reconstruct_cond_batch
        self.merge_lora_to_weight = merge_lora_to_weight
        self.memory_management = memory_management

    def loaded_loras(self) -> Optional[list]:
        """(filename, names…) of each LoRA Forge activated for this batch (`sd_forge_lora`'s
        `networks.loaded_networks`); None when that extension is not loaded."""
        import sys
        networks = sys.modules.get("networks")
        if networks is None or not hasattr(networks, "loaded_networks"):
            try:
                import networks  # extensions-builtin/sd_forge_lora
            except ImportError:
                return None
        out = []
        for net in networks.loaded_networks:
            disk = getattr(net, "network_on_disk", None)
            out.append((disk.filename, net.name, getattr(net, "mentioned_name", None),
                        getattr(disk, "name", None), getattr(disk, "alias", None)))
        return out

    def options(self):
        from modules import shared
        return shared.opts

    def lean_memory(self) -> bool:
        mm = self.memory_management
        return mm.vram_state in (mm.VRAMState.LOW_VRAM, mm.VRAMState.NO_VRAM)

    def free_memory(self, device) -> int:
        return int(self.memory_management.get_free_memory(device))

    @contextmanager
    def encoding(self, p):
        """What `get_conds_with_caching` sets up around a prompt function, undone afterwards."""
        from modules import devices
        import backend.text_processing.classic_engine as classic_engine
        saved = dict(classic_engine.last_extra_generation_params)
        try:
            with devices.autocast():
                p.sd_model.set_clip_skip(int(self.options().CLIP_stop_at_last_layers))
                yield
        finally:
            classic_engine.last_extra_generation_params = saved


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_bytes():
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


# -- helpers ----------------------------------------------------------------------------------------

@contextmanager
def scaled_text_encoder(factors, coef: float, counter: Optional[list] = None):
    """coef x the guided LoRAs' terms on every row of the text encoder (-1 = base, s - 1 = LoRA
    scale s): the same `DeltaHooks.all_rows` as A1111's text encoding. The text encoder may be
    called with any batch, so no row plan. `counter[0]` adds the layer corrections applied."""
    hooks = DeltaHooks(factors)
    try:
        with hooks.all_rows(coef):
            yield
    finally:
        if counter is not None:
            counter[0] += hooks.calls
        for delta in factors.deltas.values():
            delta.release()


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


# -- one sampling pass ------------------------------------------------------------------------------

@dataclass
class Step:
    lora_cond: list
    lora_uncond: Optional[list]
    base_cond: list
    base_uncond: Optional[list]
    fused: bool  # base rows ride in the LoRA pass (batched strategy)
    phase: str = "lora"  # lora -> base -> closed
    stash: dict = field(default_factory=dict)  # entry tag -> base rows computed in the LoRA pass


class Sampling:
    """One sampling pass (first pass or hires pass): factors, strategy, conditionings, counters.

    Its three closures go into the UNet patcher's model_options; they are plain functions, since
    Forge deep-copies model_options whenever a patcher is cloned."""

    def __init__(self, api: ForgeAPI, run: "Run", p, unet, ff, conds: dict):
        self.api, self.run, self.p, self.unet, self.ff = api, run, p, unet, ff
        self.settings = run.settings
        self.conds = conds  # base_c, base_uc, lora_c, lora_uc (None = Forge's own)
        self.model = unet.model
        self.strategy = None
        self.closed = False
        self.fits = {}  # input shape -> both branches fit in memory in one forward
        self.marks = {}  # doubled layout -> Forge's cond_mark and indices for it (_doubled_marks)

    # -- strategy, entered at the first guided step (the UNet is loaded and merged by then) ------
    def _enter_strategy(self, x: torch.Tensor):
        api, settings, record = self.api, self.settings, self.run.record
        opts = api.options()
        requested = settings.strategy
        if requested == "auto":
            requested = getattr(opts, "autolora_default_strategy", "auto") or "auto"
        budget_mb = getattr(opts, "autolora_swap_budget_mb", 0) or 0
        weights_merged = not self.ff.online
        swap_bytes = sum(m.weight.numel() * m.weight.element_size() for m in self.ff.factors.nonzero())
        name, reason = choose_strategy(
            requested, weights_merged=weights_merged, lean_memory=api.lean_memory(),
            latent_pixels_per_branch=int(x.shape[0] * x.shape[-1] * x.shape[-2]), swap_bytes=swap_bytes,
            free_bytes=api.free_memory(x.device), swap_budget_bytes=int(budget_mb * 2 ** 20) if budget_mb else None)
        if requested != "auto" and name != requested:
            self.run.note(f"AutoLoRA: {reason}", self.p)
        backup = getattr(getattr(self.model, "lora_loader", None), "backup", {})
        kwargs = {"weights_merged": weights_merged}
        if name in ("swap", "toggle", "dual"):
            # Exact: Forge's pre-LoRA backup with the unguided LoRAs merged back. (Subtracting the
            # guided LoRAs from the merged weight was measured slower on the GPU, issue 8 run 2.)
            kwargs["base_weights"] = lambda module, _delta: (
                base_weight(self.ff.params[module], merge=api.merge_lora_to_weight, backup=backup), None)
        try:
            strategy = make_strategy(name, self.ff.factors, settings.lora_scale, **kwargs)
        except StrategyUnavailable as exc:
            self.run.note(f"{exc}; using 'batched'", self.p)
            name, reason = "batched", str(exc)
            strategy = make_strategy(name, self.ff.factors, settings.lora_scale, weights_merged=weights_merged)
        self.strategy = common.enter_strategy(strategy, record)
        record.update(strategy=name, strategy_reason=reason, weights_merged=weights_merged)
        log.info("AutoLoRA: base-branch strategy %s (%s)", name, reason)

    def close(self):
        if self.strategy is not None:
            self.strategy.__exit__(None, None, None)
            self.run.base_calls_done += self.strategy.base_calls
            self.strategy = None
        # Forge's memory manager may keep the patcher clone (and with it our closures) in its list of
        # loaded models after the generation: let them hold nothing heavy (factors, conds, `p`).
        self.closed = True
        self.ff = self.p = self.unet = self.model = None
        self.conds = {}
        self.marks = {}

    def base_calls(self) -> int:
        return self.strategy.base_calls if self.strategy is not None else 0

    # -- sampler_pre_cfg_function ---------------------------------------------------------------
    def begin_step(self, model, cond, uncond, x) -> Optional[Step]:
        run, api = self.run, self.api
        if run.off or self.closed:
            return None
        if model is not self.model:
            run.off = "model changed"
            run.note("AutoLoRA: the model changed during sampling (refiner); the rest runs without AutoLoRA", self.p)
            return None
        denoiser = getattr(getattr(self.p, "sampler", None), "model_wrap_cfg", None)
        call = int(getattr(denoiser, "step", 0) or 0)
        calls = int(getattr(denoiser, "total_steps", 0) or 0)
        if not run.interval.is_full and not run.interval.contains_step(call, calls):
            run.record["plain_steps"] += 1
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
                run.note("AutoLoRA: the conditioning changed during sampling (another extension?); "
                         "those steps run without AutoLoRA", self.p)
                return None
            text[branch] = (entries_c, entries_uc)

        def twins(entries, texts):
            return None if entries is None else [e if t is e else _twin(e, t) for e, t in zip(entries, texts)]

        lora_cond, lora_uncond = twins(cond, text["lora"][0]), twins(uncond, text["lora"][1])
        base_cond, base_uncond = twins(cond, text["base"][0]), twins(uncond, text["base"][1])
        if self.strategy is None:
            self._enter_strategy(x)
        fused = self.strategy.fuses_branches
        if fused:
            lora_cond, base_cond = self._tag(lora_cond, base_cond, 0)
            if uncond is not None:
                lora_uncond, base_uncond = self._tag(lora_uncond, base_uncond, len(cond))
        run.record["guided_steps"] += 1
        return Step(lora_cond, lora_uncond, base_cond, base_uncond, fused)

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
        api = self.api

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

            if step.phase == "lora":
                if step.fused and TWIN_CROSSATTN in ours and self._can_fuse(apply_model, x, c):
                    to = c.pop("transformer_options", {})
                    base_c = dict(c, c_crossattn=ours[TWIN_CROSSATTN])
                    if TWIN_Y in ours:
                        base_c["y"] = ours[TWIN_Y]
                    to2 = doubled(to, cou, to.get("sigmas", t))

                    def forward2(x_, t_, c_):
                        return call(apply_model, x_, t_, dict(c_, transformer_options=to2), list(cou) * 2)

                    lora_out, base_out = strategy.evaluate(forward2, (x, t, c), (x, t, base_c))
                    rows = x.shape[0] // max(len(cou), 1)
                    tags = ours[TAG].reshape(-1)
                    for k in range(len(cou)):
                        step.stash[int(tags[k * rows])] = base_out[k * rows:(k + 1) * rows]
                    return lora_out
                if strategy.lora_scale != 1.0:
                    return strategy._lora_forward(forward, (x, t, c))
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
            self.run.note("AutoLoRA: ControlNet is active, so the base branch runs as a separate forward "
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
                self.run.note("AutoLoRA: not enough free memory to batch both branches; "
                              "the base branch runs as a separate forward")
                return False
        return True

    # -- sampler_cfg_function -------------------------------------------------------------------
    def cfg_function(self, step: Step, previous):
        api, settings, run = self.api, self.settings, self.run

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
            step.phase = "base"
            try:
                base_c, base_u = api.calc_cond_uncond_batch(args["model"], step.base_cond, step.base_uncond, x,
                                                            args["timestep"], args["model_options"])
            finally:
                step.phase = "closed"
                step.stash.clear()
            run.record["base_calls"] = run.base_calls_done + self.base_calls()
            lora_c, lora_u = args["cond_denoised"], args["uncond_denoised"]
            scale = float(args["cond_scale"])
            w1, w2 = resolve_cfg_scale(settings.w1, scale), resolve_cfg_scale(settings.w2, scale)
            if step.base_uncond is None:
                # CFG 1, skip-early-CFG steps, Flux: no uncond pass (its prediction is zero), so w1 and
                # w2 cannot apply: each branch is what Forge computes for it, the two-evaluation variant.
                w1 = w2 = scale
            edit_strength = sum(e.get("strength", 1) for e in step.lora_cond)
            lora = cfg_of(args, x, lora_c, lora_u, w2, edit_strength)
            base = cfg_of(args, x, base_c, base_u, w1, edit_strength)
            return x - blend(base, lora, settings.gamma)

        return cfg

    def pre_cfg_function(self):
        def pre_cfg(model, cond, uncond, x, timestep, model_options):
            step = self.begin_step(model, cond, uncond, x)
            if step is None:
                return model, cond, uncond, x, timestep, model_options
            options = dict(model_options)
            options["sampler_cfg_function"] = self.cfg_function(step, model_options.get("sampler_cfg_function"))
            options["model_function_wrapper"] = self.wrapper(step, model_options.get("model_function_wrapper"))
            return model, step.lora_cond, step.lora_uncond, x, timestep, options

        setattr(pre_cfg, OUR_MARK, True)
        return pre_cfg


# -- one generation ---------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything AutoLoRA holds for one generation (one `p`)."""

    settings: AutoLoraSettings
    record: dict
    interval: GuidanceInterval
    guided_files: set = field(default_factory=set)
    conds: dict = field(default_factory=dict)  # id(Forge's cond object) -> (that object, base, lora-scaled)
    sampling: Optional[Sampling] = None
    base_calls_done: int = 0
    te_corrections: list = field(default_factory=lambda: [0])
    notices: list = field(default_factory=list)
    off: Optional[str] = None
    p: object = None
    unet_before: object = None  # forge_objects.unet before our clone took its place...
    unet_ours: object = None  # ...and the clone carrying our sampler_pre_cfg_function

    def note(self, text: str, p=None):
        common.note_once(self.notices, self.record, text, p)

    def close_sampling(self):
        if self.sampling is not None:
            self.sampling.close()
            self.record["base_calls"] = self.base_calls_done
            self.sampling = None


class BaseCondCache:
    """Base text conditionings kept across generations, tied to the very object Forge returned.

    Forge caches each prompt's conditioning (`get_conds_with_caching`, keyed by prompts, steps,
    checkpoint, LoRAs and their strengths, size, CLIP skip...) and hands back the same object
    while none of that changes; plain generation then encodes nothing. Our base conditioning is a
    function of that same input plus the AutoLoRA settings that shape it, so while Forge returns
    the same object and those settings are equal it is the same too, and re-encoding it (both
    prompts, every text encoder, with hooks) is work plain generation does not do.
    Entries hold Forge's object itself (compared with `is`, so a recycled id cannot match); a few
    are kept, like Forge's own caches (prompt, negative prompt, their hires versions)."""

    SIZE = 4

    def __init__(self):
        self.entries = []  # (forge_result, settings_key, value, te_modules, message)

    @staticmethod
    def settings_key(run: "Run") -> tuple:
        s = run.settings
        return (frozenset(run.guided_files), float(s.lora_scale), bool(s.base_text_encoder))

    def get(self, result, key):
        for entry in self.entries:
            if entry[0] is result and entry[1] == key:
                return entry
        return None

    def put(self, result, key, value, te_modules: int, message: Optional[str]) -> None:
        self.entries = [(result, key, value, te_modules, message)] + [
            e for e in self.entries if not (e[0] is result and e[1] == key)][:self.SIZE - 1]


class ForgeAdapter:
    name = "forge"

    def __init__(self, api: Optional[ForgeAPI] = None):
        self.api = api or ForgeAPI()
        self.run: Optional[Run] = None
        self.base_conds = BaseCondCache()

    # -- start_batch: Forge activated the batch's LoRAs and is about to encode its prompts ---------
    def start_batch(self, p, settings: AutoLoraSettings) -> Optional[str]:
        run = self.run if self.run is not None and self.run.p is p else None
        if run is None:
            self.finish(None)
            record = common.DIAGNOSTICS.begin(self.name, settings)
            run = Run(settings, record, GuidanceInterval(settings.start, settings.end), p=p)
        loaded = self.api.loaded_loras()
        if loaded is None:
            return self._off(run, "AutoLoRA: the built-in LoRA extension (sd_forge_lora) is not loaded; AutoLoRA is off")
        if not loaded:
            return self._off(run, "AutoLoRA: no LoRA in the prompt, nothing to guide; generated without AutoLoRA")
        guided = common.select_guided(loaded, settings.guided_loras)  # raises for unknown names
        run.guided_files = set(guided)
        run.record["guided_loras"] = [entry[1] for entry in loaded if entry[0] in run.guided_files]
        if self.run is not run:
            self.run = run
            if settings.base_text_encoder or settings.lora_scale != 1.0:
                self._wrap_conds(p, run)
            run.record["active"] = True
            common.mark_active(p, settings)
        return None

    def _off(self, run: Run, message: str) -> str:
        run.record["notices"].append(message)
        if self.run is run:
            self.finish(run.p)
        return message

    def _wrap_conds(self, p, run: Run):
        """Encode each prompt batch Forge encodes once more without the guided LoRAs (and at LoRA
        scale s when s != 1), with Forge's own prompt function and arguments."""
        original = p.get_conds_with_caching
        adapter = self

        def get_conds_with_caching(function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
            result = original(function, required_prompts, steps, caches, extra_network_data, hires_steps)
            if adapter.run is run and result is not None:
                try:
                    run.conds[id(result)] = (result,) + adapter._encode_cached(
                        p, run, result, function, required_prompts, steps, hires_steps)
                except Exception as exc:  # the base conditioning must never break the generation
                    log.exception("AutoLoRA: base conditioning failed")
                    run.note(f"AutoLoRA: base text encoding failed ({type(exc).__name__}: {exc}); "
                             f"the base branch uses the LoRA conditioning", p)
            return result

        p.get_conds_with_caching = get_conds_with_caching

    def _encode_cached(self, p, run: Run, result, function, required_prompts, steps, hires_steps) -> tuple:
        """`_encode`, or what it gave for this very Forge conditioning and these settings before."""
        key = BaseCondCache.settings_key(run)
        hit = self.base_conds.get(result, key)
        if hit is not None:
            _, _, value, te_modules, message = hit
            run.record["te_base_cached"] += 1
        else:
            value, te_modules, message = self._encode(p, run, function, required_prompts, steps, hires_steps)
            self.base_conds.put(result, key, value, te_modules, message)
        run.record["modules"]["text_encoder"] = te_modules
        if message:
            run.note(f"AutoLoRA: {message}")
        return value

    def _encode(self, p, run: Run, function, required_prompts, steps, hires_steps) -> tuple:
        """((base conditioning, LoRA-scale conditioning), LoRA'd text-encoder modules, message)."""
        api, settings = self.api, run.settings
        patcher = p.sd_model.forge_objects.clip.patcher
        ff = read_factors(patcher.model, patcher.lora_patches, run.guided_files, merge=api.merge_lora_to_weight,
                          backup=getattr(getattr(patcher.model, "lora_loader", None), "backup", {}))
        te_modules, message = len(ff.factors.nonzero()), ff.message("text-encoder")
        if ff.empty:
            return (None, None), te_modules, message  # the guided LoRAs leave the text encoder alone
        opts = api.options()
        out = []
        for coef, wanted in ((-1.0, settings.base_text_encoder), (settings.lora_scale - 1.0, settings.lora_scale != 1.0)):
            if not wanted:
                out.append(None)
                continue
            with api.encoding(p), scaled_text_encoder(ff.factors, coef, run.te_corrections):
                out.append(function(p.sd_model, required_prompts, steps, hires_steps, opts.use_old_scheduling))
            run.record["te_base_encodes"] += 1
        return tuple(out), te_modules, message

    # -- before_sampling: Forge's process_before_every_sampling -----------------------------------
    def before_sampling(self, p, **kwargs):
        run = self.run
        if run is None or run.p is not p or not run.guided_files or run.off:
            return None
        run.close_sampling()  # hires pass: the first pass is over (or this is Forge's repeated call)
        if getattr(p, "is_hr_pass", False):  # the hires prompt may name other LoRAs
            loaded = self.api.loaded_loras() or []
            try:
                run.guided_files = set(common.select_guided(loaded, run.settings.guided_loras)) if loaded else set()
            except Exception as exc:
                run.note(f"{exc}; the hires pass runs without AutoLoRA", p)
                return None
            if not run.guided_files:
                run.note("AutoLoRA: no LoRA in the hires prompt; the hires pass runs without AutoLoRA", p)
                return None
        conds = {}
        for name, obj in (("c", kwargs.get("c")), ("uc", kwargs.get("uc"))):
            entry = run.conds.get(id(obj)) if obj is not None else None
            if entry is not None and entry[0] is obj:
                conds[f"base_{name}"], conds[f"lora_{name}"] = entry[1], entry[2]
        unet = p.sd_model.forge_objects.unet
        ff = read_factors(unet.model, unet.lora_patches, run.guided_files, merge=self.api.merge_lora_to_weight,
                          backup=getattr(getattr(unet.model, "lora_loader", None), "backup", {}))
        run.record["modules"]["unet"] = len(ff.factors.nonzero())
        message = ff.message("UNet")
        if message:
            run.note(f"AutoLoRA: {message}", p)
        if ff.empty and not any(v is not None for v in conds.values()):
            run.note("AutoLoRA: the guided LoRAs change nothing in this model; sampling without AutoLoRA", p)
            return None
        run.unet_before = unet
        unet = unet.clone()
        sampling = Sampling(self.api, run, p, unet, ff, conds)
        unet.add_sampler_pre_cfg_function(sampling.pre_cfg_function())
        unet.add_extra_preserved_memory_during_sampling(ff.nbytes())
        p.sd_model.forge_objects.unet = run.unet_ours = unet
        run.sampling = sampling
        return None

    # -- finish: end of the generation (postprocess), interrupted or not ------------------------
    def finish(self, p):
        run, self.run = self.run, None
        if run is None:
            return None
        run.close_sampling()
        if run.p is not None and "get_conds_with_caching" in vars(run.p):
            del run.p.get_conds_with_caching
        # Forge resets forge_objects at the next generation anyway; putting the patcher back now
        # drops our pre-CFG function and what its closure holds (conds, factors) between generations.
        objects = getattr(getattr(run.p, "sd_model", None), "forge_objects", None)
        if objects is not None and run.unet_ours is not None and objects.unet is run.unet_ours:
            objects.unet = run.unet_before
        if run.unet_ours is not None:  # the clone may live on in Forge's loaded-models list
            hooks = run.unet_ours.model_options.get("sampler_pre_cfg_function", [])
            hooks[:] = [f for f in hooks if not getattr(f, OUR_MARK, False)]
            run.unet_ours.extra_preserved_memory_during_sampling = run.unet_before.extra_preserved_memory_during_sampling
        run.unet_before = run.unet_ours = None
        run.conds.clear()
        record = run.record
        record["peak_vram_bytes"] = _peak_bytes()
        common.DIAGNOSTICS.end(record)
        if record.get("active"):
            log.info("AutoLoRA: %s guided steps, %s plain steps, %s base evaluations (%s); %s base text encodings",
                     record["guided_steps"], record["plain_steps"], record["base_calls"], record["strategy"],
                     record["te_base_encodes"])
        return None

    def register_xyz_axes(self):
        from modules import scripts
        xyz = common.find_xyz_module(scripts.scripts_data)
        if xyz is not None:
            common.add_xyz_axes(xyz)
        return xyz is not None

    def residue(self) -> dict:
        """What is registered now (GET /autolora/v1/residue): the host's callback lists, hooks on the
        UNet and text encoder modules, our sampler hooks on the current UNet patcher, open runs."""
        from modules import script_callbacks, shared
        objects = getattr(shared.sd_model, "forge_objects", None)
        roots, pre_cfg = [], 0
        if objects is not None:
            roots = [getattr(objects.unet, "model", None), getattr(objects.clip, "cond_stage_model", None)]
            pre_cfg = len(objects.unet.model_options.get("sampler_pre_cfg_function", []))
        return common.residue_counts(script_callbacks.callback_map, [r for r in roots if r is not None], {
            "open_runs": int(self.run is not None), "unet_pre_cfg_functions": pre_cfg})
