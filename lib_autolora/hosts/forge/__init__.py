"""AutoLoRA on Stable Diffusion WebUI Forge (main): the core bound to Forge's sampling hooks.

The user's LoRAs stay exactly as Forge applies them (merged "offline", or on the fly "online"), so
the LoRA branch is Forge's own evaluation. The base branch (every guided LoRA removed, the
unguided ones kept) is built the Forge way: its text conditioning in conditioning.py, its UNet
evaluation in sampling.py, the guided LoRAs' factors read from Forge's patches in factors.py.

Forge's low-VRAM offloading keeps working: the hooks act on layer outputs wherever the weights
live, and the factors' size is reserved with `add_extra_preserved_memory_during_sampling`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

from ...generation import Generation
from .. import networks
from ..adapter import Adapter
from .conditioning import BaseCondCache, BaseConditioning
from .factors import read_factors
from .patcher import UNTOLD_NOTICE, guided_sources, missing_convention, originals, patch_sets
from .sampling import HOOK_MARK, Sampling

NAME = "forge"


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
        self.context_handler = _context_handler

    def encode_prompts(self, function, model, prompts, steps, hires_steps):
        return call_prompt_function(function, self.options(), model, prompts, steps, hires_steps)

    def loaded_loras(self) -> Optional[list]:
        """(filename, names…) of each LoRA Forge activated for this batch; None without `sd_forge_lora`."""
        nets = networks.loaded()
        return None if nets is None else [(net.network_on_disk.filename, *networks.names_of(net)) for net in nets]

    def options(self):
        from modules import shared
        return shared.opts

    def lean_memory(self) -> bool:
        mm = self.memory_management
        return mm.vram_state in (mm.VRAMState.LOW_VRAM, mm.VRAMState.NO_VRAM)

    def free_memory(self, device) -> int:
        return int(self.memory_management.get_free_memory(device))

    @staticmethod
    def _infotext_buffer() -> dict:
        """Where the text engines leave infotext for `get_conds_with_caching` (Emphasis, TI): a
        global of classic_engine on Forge main, `dynamic_args` on later Forge Neo."""
        import backend.text_processing.classic_engine as classic_engine
        if hasattr(classic_engine, "last_extra_generation_params"):
            return classic_engine.last_extra_generation_params
        from backend.args import dynamic_args
        return dynamic_args.last_extra_generation_params

    @contextmanager
    def encoding(self, p):
        """What `get_conds_with_caching` sets up around a prompt function, undone afterwards: our
        encodings must leave no infotext of their own."""
        from modules import devices
        buffer = self._infotext_buffer()
        saved = dict(buffer)
        try:
            with devices.autocast():
                p.sd_model.set_clip_skip(int(self.options().CLIP_stop_at_last_layers))
                yield
        finally:
            buffer = self._infotext_buffer()
            buffer.clear()
            buffer.update(saved)


def call_prompt_function(function, opts, model, prompts, steps, hires_steps):
    """The host's prompt function called as its `get_conds_with_caching` calls it: Forge main passes
    the `use_old_scheduling` option as a fifth argument, Forge Neo 2.x has neither."""
    extra = ()
    if "use_old_scheduling" in _parameters(function):
        extra = (bool(getattr(opts, "use_old_scheduling", False)),)
    return function(model, prompts, steps, hires_steps, *extra)


def _parameters(function) -> tuple:
    import inspect
    try:
        return tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return ()


def _context_handler():
    """Forge Neo 2.x's context windows (video models): when its handler takes a step, the host
    evaluates the conds through it, and so must the base branch. None where there is none."""
    try:
        from backend.args import dynamic_args
    except ImportError:
        return None
    return getattr(dynamic_args, "context_handler", None)


def missing_capability(sampling_function_module=None, patcher_cls=None) -> Optional[str]:
    """Why this WebUI's Forge backend cannot carry AutoLoRA, or None when it can: the binding needs
    Forge's sampling step (`sampling_function_inner` running the `sampler_pre_cfg_function` list,
    `calc_cond_uncond_batch` and `sampler_cfg_function`), its LoRA patch merge, and a ModelPatcher
    that keeps LoRAs in a layout patcher.py reads (checked on a one-layer patcher)."""
    import inspect
    try:
        if sampling_function_module is None:
            from backend.sampling import sampling_function as sampling_function_module
            from backend.patcher.lora import merge_lora_to_weight  # noqa: F401 - the patch format we read
        if patcher_cls is None:
            from backend.patcher.base import ModelPatcher as patcher_cls
        source = inspect.getsource(sampling_function_module.sampling_function_inner)
    except (ImportError, AttributeError, OSError, TypeError) as exc:
        return f"its Forge backend lacks what AutoLoRA binds to ({type(exc).__name__}: {exc})"
    missing = [name for name in ("sampler_pre_cfg_function", "calc_cond_uncond_batch(", "sampler_cfg_function")
               if name not in source]
    if missing:
        return f"its Forge sampling step has no {', '.join(m.rstrip('(') for m in missing)}"
    return missing_convention(patcher_cls)


@dataclass
class ForgeState:
    """The Forge-specific part of one generation (`Generation.host_state`)."""

    conds: dict = field(default_factory=dict)  # id(the host's cond object) -> (that object, base, lora-scaled)
    sampling: Optional[Sampling] = None
    unet_before: object = None  # forge_objects.unet before our clone took its place...
    unet_ours: object = None  # ...and the clone carrying our pre-CFG function

    def close_sampling(self):
        if self.sampling is not None:
            self.sampling.close()
            self.sampling = None


class ForgeAdapter(Adapter):
    name = NAME

    def __init__(self, api: Optional[ForgeAPI] = None, register_callbacks: bool = True, fused: bool = True):
        super().__init__()
        self.api = api or ForgeAPI()
        self.fused = fused  # both branches in one forward where the strategy and the step allow (fused.py)
        self.base_conditioning = BaseConditioning(self.api, BaseCondCache())
        if register_callbacks:
            from modules import script_callbacks
            script_callbacks.on_cfg_after_cfg(self.after_cfg, name="autolora")

    def loaded_loras(self) -> Optional[list]:
        return self.api.loaded_loras()

    def open_batch(self, p, gen: Generation) -> None:
        if gen.host_state is None:  # the first batch: every prompt the host encodes from now on gets its twins
            gen.host_state = ForgeState()
            if gen.settings.base_text_encoder or gen.settings.lora_scale != 1.0:
                self.base_conditioning.wrap(p, gen, gen.host_state.conds)

    def bind_pass(self, p, gen: Generation, c, uc) -> None:
        """The host's process_before_every_sampling: the guided LoRAs' factors on the UNet, and our
        pre-CFG function on a clone of its patcher."""
        state = gen.host_state
        state.close_sampling()  # the hires pass: the first pass is over (or the host called twice)
        unet = p.sd_model.forge_objects.unet
        sets = patch_sets(unet, gen.loaded)
        sources = guided_sources(sets, gen.guided, set(gen.loaded))
        if sources is None:
            gen.note(UNTOLD_NOTICE, p.comment)
            return
        guided = read_factors(unet.model, sets, sources, merge=self.api.merge_lora_to_weight, original=originals(unet))
        gen.stats.modules["unet"] = len(guided.factors.nonzero())
        if guided.message("UNet"):
            gen.note(f"AutoLoRA: {guided.message('UNet')}", p.comment)
        conds = self._pass_conds(state, c, uc)
        if guided.empty and not any(v is not None for v in conds.values()):
            gen.note("AutoLoRA: the guided LoRAs change nothing in this model; sampling without AutoLoRA", p.comment)
            return
        ours = unet.clone()
        state.sampling = Sampling(self.api, gen, p, ours, guided, conds, fused=self.fused)
        ours.add_sampler_pre_cfg_function(state.sampling.pre_cfg_function())
        ours.add_extra_preserved_memory_during_sampling(guided.nbytes())
        state.unet_before, state.unet_ours = unet, ours
        p.sd_model.forge_objects.unet = ours

    @staticmethod
    def _pass_conds(state: ForgeState, c, uc) -> dict:
        """The twins the host's encodings of this pass's prompts left (none: the host's own serve)."""
        conds = {}
        for name, obj in (("c", c), ("uc", uc)):
            entry = state.conds.get(id(obj)) if obj is not None else None
            if entry is not None and entry[0] is obj:
                conds[f"base_{name}"], conds[f"lora_{name}"] = entry[1], entry[2]
        return conds

    def after_cfg(self, params) -> None:
        """script_callbacks.on_cfg_after_cfg, at the end of each CFGDenoiser step: DDIM CFG++'s
        unconditional prediction becomes the sampled model's (Sampling.correct_last_noise_uncond)."""
        state = self.gen.host_state if self.gen is not None else None
        sampling = getattr(state, "sampling", None)
        if sampling is not None and sampling.last_guided is not None:
            sampling.correct_last_noise_uncond(getattr(self.p.sampler, "model_wrap_cfg", None))

    def close(self, gen: Generation, p) -> None:
        state = gen.host_state
        if state is None:
            return
        state.close_sampling()
        BaseConditioning.unwrap(p)
        # The host resets forge_objects at the next generation anyway; putting the patcher back now
        # drops our pre-CFG function and what its closure holds (conds, factors) between generations.
        objects = getattr(getattr(p, "sd_model", None), "forge_objects", None)
        if objects is not None and state.unet_ours is not None and objects.unet is state.unet_ours:
            objects.unet = state.unet_before
        if state.unet_ours is not None:  # the clone may live on in the host's loaded-models list
            hooks = state.unet_ours.model_options.get("sampler_pre_cfg_function", [])
            hooks[:] = [f for f in hooks if not getattr(f, HOOK_MARK, False)]
            state.unet_ours.extra_preserved_memory_during_sampling = \
                state.unet_before.extra_preserved_memory_during_sampling
        state.unet_before = state.unet_ours = None
        state.conds.clear()
