"""AutoLoRA on the Forge family (Forge main, Forge Neo, reForge, Forge Classic): the core bound to
their sampling hooks, through the description of the WebUI's backend in api.py.

The user's LoRAs stay exactly as the WebUI applies them (merged, or applied per call), so the
LoRA branch is the WebUI's own evaluation. The base branch (every guided LoRA removed, the
unguided ones kept) is built the same way on every member: its text conditioning in
conditioning.py, its UNet evaluation in sampling.py, the guided LoRAs' factors read from the
ModelPatcher's patches (patcher.py, factors.py).

Forge's low-VRAM offloading keeps working: the hooks act on layer outputs wherever the weights
live, and the factors' size is reserved with `add_extra_preserved_memory_during_sampling`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ...generation import Generation
from ..adapter import Adapter, register_callback
from .api import MODIFIERS, PRE_CFG, ForgeAPI
from .conditioning import BaseCondCache, BaseConditioning
from .factors import read_factors
from .patcher import UNTOLD_NOTICE, clones_share_weights, guided_sources, originals, patch_sets
from .sampling import HOOK_MARK, Sampling

NAME = "forge"


@dataclass
class ForgeState:
    """The Forge-specific part of one generation (`Generation.host_state`)."""

    conds: dict = field(default_factory=dict)  # id(the host's cond object) -> (that object, base, lora-scaled)
    sampling: Optional[Sampling] = None
    patcher: object = None  # the UNet patcher carrying our step function (a clone, or the host's own)
    replaced: object = None  # forge_objects.unet our clone took the place of (None: hooked in place)
    memory_before: int = 0  # the patcher's extra preserved memory before ours

    def unbind(self, p) -> None:
        """The pass is over: our function off the patcher, the host's patcher back in place."""
        if self.sampling is not None:
            self.sampling.close()
            self.sampling = None
        if self.patcher is None:
            return
        options = self.patcher.model_options
        for name in (PRE_CFG, MODIFIERS):  # the clone may live on in the host's loaded-models list
            if name in options:
                options[name] = [f for f in options[name] if not getattr(f, HOOK_MARK, False)]
        self.patcher.extra_preserved_memory_during_sampling = self.memory_before
        objects = getattr(getattr(p, "sd_model", None), "forge_objects", None)
        if objects is not None and self.replaced is not None and objects.unet is self.patcher:
            objects.unet = self.replaced
        self.patcher = self.replaced = None


class ForgeAdapter(Adapter):
    name = NAME

    def __init__(self, api=None, register_callbacks: bool = True, fused: bool = True):
        super().__init__()
        self.api = api or ForgeAPI()
        self.fused = fused  # both branches in one forward where the strategy and the step allow (fused.py)
        self.base_conditioning = BaseConditioning(self.api, BaseCondCache())
        if register_callbacks:
            from modules import script_callbacks
            register_callback(script_callbacks.on_cfg_after_cfg, self.after_cfg)

    def loaded_loras(self) -> Optional[list]:
        return self.api.loaded_loras()

    def open_batch(self, p, gen: Generation) -> None:
        if gen.host_state is None:  # the first batch: every prompt the host encodes from now on gets its twins
            gen.host_state = ForgeState()
            if gen.settings.base_text_encoder or gen.settings.lora_scale != 1.0:
                self.base_conditioning.wrap(p, gen, gen.host_state.conds)

    def bind_pass(self, p, gen: Generation, c, uc) -> None:
        """The host's process_before_every_sampling: the guided LoRAs' factors on the UNet, and our
        step function on its patcher (a clone where cloning leaves the merged weights alone)."""
        state = gen.host_state
        state.unbind(p)  # the hires pass: the first pass is over (or the host called twice)
        unet = p.sd_model.forge_objects.unet
        refusal = self.api.unsupported(p)
        sets = patch_sets(unet, gen.loaded)
        sources = guided_sources(sets, gen.guided, set(gen.loaded))
        if refusal or sources is None:
            gen.note(refusal or UNTOLD_NOTICE, p.comment)
            return
        guided = read_factors(unet.model, sets, sources, merge=self.api.merge_for(unet), original=originals(unet))
        gen.stats.modules["unet"] = len(guided.factors.nonzero())
        gen.stats.dense_layers = max(gen.stats.dense_layers, guided.factors.dense_count())
        if guided.message("UNet"):
            gen.note(f"AutoLoRA: {guided.message('UNet')}", p.comment)
        conds = self._pass_conds(state, c, uc)
        if guided.empty and not any(v is not None for v in conds.values()):
            gen.note("AutoLoRA: the guided LoRAs change nothing in this model; sampling without AutoLoRA", p.comment)
            return
        ours = unet.clone() if clones_share_weights(unet) else unet
        state.patcher, state.replaced, state.memory_before = ours, (unet if ours is not unet else None), \
            ours.extra_preserved_memory_during_sampling
        state.sampling = Sampling(self.api, gen, p, ours, guided, conds, fused=self.fused)
        ours.model_options[self.api.step_hook] = ours.model_options.get(self.api.step_hook, []) + [
            state.sampling.step_function(self.api.step_hook)]
        ours.add_extra_preserved_memory_during_sampling(guided.factors.nbytes())
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
        if sampling is not None and sampling.last_guided is not None and self.api.corrects_last_noise_uncond:
            sampling.correct_last_noise_uncond(getattr(self.p.sampler, "model_wrap_cfg", None))

    def close(self, gen: Generation, p) -> None:
        state = gen.host_state
        if state is None:
            return
        # The host resets forge_objects at the next generation anyway; putting the patcher back now
        # drops our step function and what its closure holds (conds, factors) between generations.
        state.unbind(p)
        BaseConditioning.unwrap(p)
        state.conds.clear()
