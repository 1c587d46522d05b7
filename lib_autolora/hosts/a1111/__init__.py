"""AutoLoRA inside AUTOMATIC1111 v1.10: the core bound to the CFG denoiser's callbacks.

Where it binds to the host, and why there:
- factors: read from the built-in Lora extension's loaded networks once the host activated them
  for the batch (factors.py);
- base conditioning: the host's prompt_parser on a model wrapper whose text encoders run without
  the guided LoRAs (conditioning.py);
- per step: `on_cfg_denoiser` / `on_cfg_denoised` (binding.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ...base_branch import DeltaHooks
from ...generation import Generation
from ... import memory
from .. import networks
from ..adapter import Adapter, open_strategy, register_callback
from . import binding
from .binding import checkpoint_key, unwrap
from .conditioning import CondPair, encode_pass, pass_prompts
from .factors import A1111Factors, MhaSwap, base_weights_fn, network_signature, read_factors, summarize_skipped

NAME = "a1111"


class A1111API:
    """The A1111 modules the adapter uses, imported in one place (the tests pass stand-ins)."""

    def __init__(self):
        from modules import devices, prompt_parser, sd_samplers, shared
        self.shared, self.devices, self.prompt_parser, self.sd_samplers = shared, devices, prompt_parser, sd_samplers


def missing_capability(cfg_denoiser_module=None) -> Optional[str]:
    """Why this WebUI's CFG denoiser cannot carry AutoLoRA, or None when it can.

    The binding needs A1111's own step: `CFGDenoiser.forward` runs the cfg_denoiser callbacks,
    calls the model through `self.inner_model` and combines the rows with `self.combine_denoised`.
    WebUIs that kept the class but sample through another backend (reForge's `sampling_function`,
    Forge Classic's `forge_sample`) never call the wrapped model: AutoLoRA would do nothing there."""
    import inspect
    if cfg_denoiser_module is None:
        from modules import sd_samplers_cfg_denoiser as cfg_denoiser_module
    forward = getattr(getattr(cfg_denoiser_module, "CFGDenoiser", None), "forward", None)
    if forward is None:
        return "its sampler has no CFGDenoiser.forward"
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return "the source of its CFG denoiser cannot be read"
    for other in ("forge_sample(", "sampling_function("):
        if other in source:
            return (f"its CFG denoiser samples through its own backend ({other.rstrip('(')}), which AutoLoRA "
                    f"does not support yet")
    if not all(call in source for call in ("cfg_denoiser_callback(", "self.inner_model(", "self.combine_denoised(")):
        return "its CFG denoiser does not call the model and combine_denoised the way A1111 v1.10 does"
    return None


def unsupported_model(model) -> Optional[str]:
    if getattr(model, "cond_stage_key", None) == "edit":
        return "AutoLoRA: instruct-pix2pix (edit) checkpoints are not supported; generated without AutoLoRA"
    if getattr(getattr(model, "model", None), "conditioning_key", None) == "crossattn-adm":
        return "AutoLoRA: unCLIP (crossattn-adm) checkpoints are not supported; generated without AutoLoRA"
    return None


@dataclass
class A1111State:
    """The A1111-specific part of one generation (`Generation.host_state`)."""

    api: object
    checkpoint: object = None  # checkpoint_key() of the model the factors were read from
    factors: Optional[A1111Factors] = None
    weights_merged: bool = True  # the Lora extension merges (False: its lora_functional option)
    te_hooks: Optional[DeltaHooks] = None
    mha_swap: Optional[MhaSwap] = None
    pairs: dict = field(default_factory=dict)  # id(host cond object) -> (host cond, CondPair)
    cond_cache: dict = field(default_factory=dict)
    wrapped: list = field(default_factory=list)  # denoisers with a step proxy in place

    def open_strategy(self, gen: Generation, p, x) -> None:
        """At the first guided step of a pass: `auto` judges by this step's latent size."""
        open_strategy(
            gen, self.api.shared.opts, self.factors.unet, p, weights_merged=self.weights_merged,
            latent_pixels_per_branch=int(getattr(p, "batch_size", 1)) * int(x.shape[-1]) * int(x.shape[-2]),
            free_bytes=memory.free_bytes(), base_weights=base_weights_fn(self.factors, networks.networks_module()))

    def close_pass(self, gen: Generation):
        for denoiser in list(self.wrapped):
            unwrap(denoiser)
        self.wrapped.clear()
        gen.close_strategy()
        if self.te_hooks is not None:
            self.te_hooks.remove()
        self.pairs.clear()
        self.cond_cache.clear()


class A1111Adapter(Adapter):
    name = NAME

    def __init__(self, api: Optional[A1111API] = None, register_callbacks: bool = True):
        super().__init__()
        self.api = api or A1111API()
        if register_callbacks:
            from modules import script_callbacks
            register_callback(script_callbacks.on_cfg_denoiser, self.on_cfg_denoiser)
            register_callback(script_callbacks.on_cfg_denoised, binding.on_cfg_denoised)

    def on_cfg_denoiser(self, params_) -> None:
        gen = self.generation(getattr(params_.denoiser, "p", None))
        if gen is not None:
            binding.on_cfg_denoiser(self.api, gen, params_)

    def loaded_loras(self) -> Optional[list]:
        nets = networks.loaded()
        return None if nets is None else [(net, *networks.names_of(net)) for net in nets]

    def refusal(self, p) -> Optional[str]:
        return unsupported_model(self.api.shared.sd_model)

    def open_batch(self, p, gen: Generation) -> None:
        if gen.host_state is None:
            gen.host_state = A1111State(self.api, checkpoint=checkpoint_key(self.api.shared.sd_model))
        self._refresh(p, gen)

    def bind_pass(self, p, gen: Generation, c, uc) -> None:
        """The host's process_before_every_sampling: the first pass, and the hires pass with its own
        LoRAs and prompts."""
        if uc is None:
            return
        if gen.hires:
            self._refresh(p, gen)
        if gen.host_state.factors is not None:
            gen.host_state.pairs[id(c)] = (c, self._base_conds(p, gen))

    def close(self, gen: Generation, p) -> None:
        if gen.host_state is not None:
            gen.host_state.close_pass(gen)

    def _refresh(self, p, gen: Generation) -> None:
        """(Re)read the factors when the loaded LoRAs or the checkpoint changed."""
        state, loaded = gen.host_state, networks.loaded() or []
        checkpoint = checkpoint_key(self.api.shared.sd_model)
        if state.factors is not None and state.factors.signature == network_signature(loaded) and \
                checkpoint == state.checkpoint:
            return
        state.close_pass(gen)
        state.checkpoint, state.factors = checkpoint, None
        guided = [net for net in loaded if net in gen.guided]
        if not guided:
            gen.note("AutoLoRA: no LoRA in this pass's prompt; this pass runs without AutoLoRA", p.comment)
            return
        state.weights_merged = not bool(getattr(self.api.shared.opts, "lora_functional", False))
        state.factors = read_factors(loaded, guided, state.weights_merged,
                                     getattr(self.api.shared.sd_model, "network_layer_mapping", None))
        for name, key, reason in summarize_skipped(state.factors.skipped):
            gen.note(f"AutoLoRA: {name}: {key}: {reason}; kept in both branches", p.comment)
        state.te_hooks = DeltaHooks(state.factors.te)
        state.mha_swap = MhaSwap(state.factors, getattr(networks.networks_module(), "network_apply_weights", None))
        gen.stats.modules = {"text_encoder": len(state.factors.te.nonzero()) + len(state.factors.mha),
                             "unet": len(state.factors.unet.nonzero())}
        gen.stats.dense_layers = max(gen.stats.dense_layers,  # the hires pass may read other LoRAs
                                     state.factors.te.dense_count() + state.factors.unet.dense_count())

    def _base_conds(self, p, gen: Generation) -> CondPair:
        """Base (and LoRA-scale) conditioning of this pass's prompts, as p.setup_conds encodes them."""
        api, state, settings = self.api, gen.host_state, gen.settings
        prompts = pass_prompts(p, gen.hires, api.sd_samplers.find_sampler_config)
        if (not settings.base_text_encoder and settings.lora_scale == 1.0) or \
                not (state.factors.te.nonzero() or state.factors.mha):
            return CondPair()  # the host's own conditioning serves both branches
        key = (*map(tuple, prompts[:2]), *prompts[2:], state.factors.signature, api.shared.opts.use_old_scheduling)
        if key not in state.cond_cache:
            state.cond_cache[key] = encode_pass(api, api.shared.sd_model, gen, state.te_hooks, state.mha_swap,
                                                *prompts, p.comment)
        return state.cond_cache[key]
