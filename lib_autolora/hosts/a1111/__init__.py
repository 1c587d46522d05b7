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
from .. import memory, networks
from ..prompts import select_guided
from .binding import GENERATION_ATTR, on_cfg_denoised, on_cfg_denoiser, unwrap
from .conditioning import CondPair, encode_pass, pass_prompts
from .factors import A1111Factors, MhaSwap, base_weights_fn, network_signature, read_factors, summarize_skipped

NAME = "a1111"
_OPEN: list = []  # generations not finished yet (A1111 skips postprocess when a generation raises)


def _host():
    """The A1111 modules the adapter uses, imported lazily so this package imports without A1111."""
    from modules import devices, prompt_parser, sd_samplers, shared  # noqa: F401
    return shared, devices, prompt_parser, sd_samplers


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


def checkpoint_key(model):
    info = getattr(model, "sd_checkpoint_info", None)
    return (getattr(info, "filename", None), getattr(info, "title", None), id(model)) if info is not None else id(model)


def unsupported_model(model) -> Optional[str]:
    if getattr(model, "cond_stage_key", None) == "edit":
        return "AutoLoRA: instruct-pix2pix (edit) checkpoints are not supported; generated without AutoLoRA"
    if getattr(getattr(model, "model", None), "conditioning_key", None) == "crossattn-adm":
        return "AutoLoRA: unCLIP (crossattn-adm) checkpoints are not supported; generated without AutoLoRA"
    return None


def _swap_budget(opts) -> Optional[int]:
    mb = getattr(opts, "autolora_swap_budget_mb", 0) or 0
    return int(mb) * 2 ** 20 if mb > 0 else None


@dataclass
class A1111State:
    """The A1111-specific part of one generation (`Generation.host_state`)."""

    host: tuple  # shared, devices, prompt_parser
    checkpoint: object = None  # checkpoint_key() of the model the factors were read from
    factors: Optional[A1111Factors] = None
    te_hooks: Optional[DeltaHooks] = None
    mha_swap: Optional[MhaSwap] = None
    pairs: dict = field(default_factory=dict)  # id(host cond object) -> (host cond, CondPair)
    cond_cache: dict = field(default_factory=dict)
    wrapped: list = field(default_factory=list)  # denoisers with a step proxy in place
    model_key: object = staticmethod(checkpoint_key)

    def close_pass(self, gen: Generation):
        for denoiser in list(self.wrapped):
            unwrap(denoiser)
        self.wrapped.clear()
        gen.close_strategy()
        if self.te_hooks is not None:
            self.te_hooks.remove()
        self.pairs.clear()
        self.cond_cache.clear()


class A1111Adapter:
    name = NAME
    available = True
    reason = None

    def __init__(self, register_callbacks: bool = True):
        if register_callbacks:
            from modules import script_callbacks
            script_callbacks.on_cfg_denoiser(on_cfg_denoiser, name="autolora")
            script_callbacks.on_cfg_denoised(on_cfg_denoised, name="autolora")

    def generation(self, p) -> Optional[Generation]:
        return getattr(p, GENERATION_ATTR, None)

    # -- the interface -------------------------------------------------------------------------
    def start_batch(self, p, settings) -> Optional[str]:
        """Called per batch after the host activated the prompt's LoRAs."""
        gen = self.generation(p)
        if gen is not None:  # batch 2+ of the same generation: keep it, refresh the factors
            self._refresh(p, gen)
            gen.begin_batch()
            return None
        for stale in list(_OPEN):
            self._close(stale)
        shared, devices, prompt_parser, _ = _host()
        gen = Generation(settings, NAME)
        reason = unsupported_model(shared.sd_model)
        if reason is None and networks.networks_module() is None:
            reason = "AutoLoRA: the built-in Lora extension is not loaded; AutoLoRA is off"
        if reason is None and not networks.loaded():
            reason = "AutoLoRA: no LoRA in the prompt, nothing to guide; generated without AutoLoRA"
        if reason:
            gen.stats.notices.append(reason)
            gen.finish()
            return reason
        gen.host_state = A1111State((shared, devices, prompt_parser), checkpoint=checkpoint_key(shared.sd_model))
        _OPEN.append(gen)
        setattr(p, GENERATION_ATTR, gen)
        try:
            self._refresh(p, gen)
        except BaseException:
            self._close(gen, p)
            raise
        if self.generation(p) is gen:
            gen.stats.active = True
            gen.begin_batch()
        return None

    def before_sampling(self, p, **kwargs):
        """process_before_every_sampling: the first pass, and the hires pass with its own conds."""
        gen = self.generation(p)
        if gen is None:
            return None
        c, uc = kwargs.get("c"), kwargs.get("uc")
        if c is None or uc is None:
            return None
        hires = bool(getattr(p, "is_hr_pass", False))
        gen.hires = hires
        if hires:
            self._refresh(p, gen)
            if self.generation(p) is not gen:
                return None
        if gen.explicit_cfg_ignored(getattr(p, "cfg_scale", 0)):
            gen.note("AutoLoRA: at CFG 1 the WebUI evaluates no negative prompt, so w1 and w2 do not apply",
                     p.comment)
        gen.host_state.pairs[id(c)] = (c, self._base_conds(p, gen, hires))
        return None

    def finish(self, p):
        gen = self.generation(p) if p is not None else None
        if gen is not None:
            self._close(gen, p)

    # -- internals ---------------------------------------------------------------------------------
    def _close(self, gen: Generation, p=None):
        try:
            gen.host_state.close_pass(gen)
        finally:
            if gen in _OPEN:
                _OPEN.remove(gen)
            if p is not None and self.generation(p) is gen:
                setattr(p, GENERATION_ATTR, None)
            gen.finish(memory.peak_bytes())

    def _refresh(self, p, gen: Generation) -> None:
        """(Re)read factors when the loaded networks or the checkpoint changed; (re)open the strategy."""
        shared = _host()[0]
        state = gen.host_state
        loaded = networks.loaded() or []
        checkpoint = checkpoint_key(shared.sd_model)
        if state.factors is not None and state.factors.signature == network_signature(loaded) and \
                checkpoint == state.checkpoint:
            return
        state.close_pass(gen)
        state.checkpoint = checkpoint
        if not loaded:
            state.factors = None
            gen.note("AutoLoRA: no LoRA in this pass's prompt; this pass runs without AutoLoRA", p.comment)
            return
        settings = gen.settings
        guided_ids = {id(n) for n in select_guided([(net, *networks.names_of(net)) for net in loaded],
                                                    settings.guided_loras)}
        guided = [n for n in loaded if id(n) in guided_ids]
        weights_merged = not bool(getattr(shared.opts, "lora_functional", False))
        factors = read_factors(loaded, guided, weights_merged, getattr(shared.sd_model, "network_layer_mapping", None))
        state.factors = factors
        for name, key, reason in summarize_skipped(factors.skipped):
            gen.note(f"AutoLoRA: {name}: {key}: {reason}; kept in both branches", p.comment)
        module = networks.networks_module()
        gen.open_strategy(
            factors.unet, default=getattr(shared.opts, "autolora_default_strategy", "auto"),
            weights_merged=weights_merged,
            latent_pixels_per_branch=int(p.batch_size) * (int(p.width) // 8) * (int(p.height) // 8),
            free_bytes=memory.free_bytes(), swap_budget_bytes=_swap_budget(shared.opts),
            base_weights=base_weights_fn(factors, module), comment=p.comment)
        state.te_hooks = DeltaHooks(factors.te)
        state.mha_swap = MhaSwap(factors, getattr(module, "network_apply_weights", None))
        gen.stats.guided_loras = [n.name for n in guided]
        gen.stats.modules = {"text_encoder": len(factors.te.nonzero()) + len(factors.mha),
                             "unet": len(factors.unet.nonzero())}

    def _base_conds(self, p, gen: Generation, hires: bool):
        """Base (and LoRA-scale) conditioning of this pass's prompts, as p.setup_conds encodes them."""
        shared, devices, prompt_parser, sd_samplers = _host()
        state = gen.host_state
        prompts, negatives, width, height, steps, hires_steps = pass_prompts(p, hires, sd_samplers.find_sampler_config)
        settings = gen.settings
        if state.factors is None or (not settings.base_text_encoder and settings.lora_scale == 1.0) or \
                not (state.factors.te.nonzero() or state.factors.mha):
            return CondPair()  # the host's own conditioning serves both branches (no guided LoRA on the text encoders)
        key = (tuple(prompts), tuple(negatives), width, height, steps, hires_steps, state.factors.signature,
               shared.opts.use_old_scheduling)
        if key not in state.cond_cache:
            state.cond_cache[key] = encode_pass(
                (shared, devices, prompt_parser), shared.sd_model, gen, state.te_hooks, state.mha_swap,
                prompts, negatives, width, height, steps, hires_steps, p.comment)
        return state.cond_cache[key]
