"""What the Forge family's WebUIs offer the binding, one description per backend.

- `ForgeAPI`: the `backend` package of Forge main and Forge Neo. The step hook is the
  `sampler_pre_cfg_function` list, which the sampling step runs before it evaluates the conds.
- `LdmPatchedAPI`: the `ldm_patched` + `modules_forge` backend of reForge and Forge Classic. Their
  `sampler_pre_cfg_function` lists differ (reForge runs ComfyUI's, after the conds), so the step
  hook is the `conditioning_modifiers` list both run before their sampling function.

Everything else the binding needs reads the same on every member of the family: ModelPatcher
patches and backups (patcher.py), model options with a CFG function and a model function wrapper,
a batch function with the host's `calc_cond_uncond_batch` signature. Only this module imports
the hosts' modules (lazily); the tests hand the binding stand-ins of these objects instead.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Callable, Optional

import torch

from .. import networks
from .patcher import missing_convention

PRE_CFG = "sampler_pre_cfg_function"
MODIFIERS = "conditioning_modifiers"


def call_prompt_function(function, opts, model, prompts, steps, hires_steps):
    """The host's prompt function called as its `get_conds_with_caching` calls it: Forge main (and
    the ldm_patched WebUIs) pass the `use_old_scheduling` option as a fifth argument, Forge Neo 2.x
    has neither."""
    extra = ()
    if "use_old_scheduling" in _parameters(function):
        extra = (bool(getattr(opts, "use_old_scheduling", False)),)
    return function(model, prompts, steps, hires_steps, *extra)


def _parameters(function) -> tuple:
    try:
        return tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return ()


def _source(function) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""


class FamilyAPI:
    """What both backends share: the built-in LoRA extension, the options, the prompt functions."""

    step_hook = PRE_CFG  # the model-options list the binding's per-step function goes into
    corrects_last_noise_uncond = True  # DDIM CFG++ keeps the LoRA branch's uncond there (not its CFG result)
    context_handler = staticmethod(lambda: None)

    def loaded_loras(self) -> Optional[list]:
        """(filename, names…) of each LoRA the host activated for this batch; None without its LoRA extension."""
        nets = networks.loaded()
        return None if nets is None else [(net.network_on_disk.filename, *networks.names_of(net)) for net in nets]

    def options(self):
        from modules import shared
        return shared.opts

    def encode_prompts(self, function, model, prompts, steps, hires_steps):
        return call_prompt_function(function, self.options(), model, prompts, steps, hires_steps)

    def lean_memory(self) -> bool:
        mm = self.memory_management
        return mm.vram_state in (mm.VRAMState.LOW_VRAM, mm.VRAMState.NO_VRAM)

    def free_memory(self, device) -> int:
        return int(self.memory_management.get_free_memory(device))

    def merge_for(self, patcher) -> Callable:
        """`merge(patches, weight, key, computation_dtype=…)`: the host's merge of patch entries."""
        return self.merge_lora_to_weight

    def unsupported(self, p) -> Optional[str]:
        """Why this generation's settings cannot be guided on this host, or None."""
        return None

    @contextmanager
    def encoding(self, p):
        """What `get_conds_with_caching` sets up around a prompt function, undone afterwards: our
        encodings must leave no infotext of their own."""
        from modules import devices
        buffer = self.infotext_buffer()
        saved = dict(buffer)
        try:
            with devices.autocast():
                self.before_encoding(p)
                yield
        finally:
            buffer = self.infotext_buffer()
            buffer.clear()
            buffer.update(saved)

    def before_encoding(self, p) -> None:
        return None


class ForgeAPI(FamilyAPI):
    """Forge main and Forge Neo (the `backend` package)."""

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

    @staticmethod
    def context_handler():
        """Forge Neo 2.x's context windows (video models): when its handler takes a step, the host
        evaluates the conds through it, and so must the base branch. None where there is none."""
        try:
            from backend.args import dynamic_args
        except ImportError:
            return None
        return getattr(dynamic_args, "context_handler", None)

    @staticmethod
    def infotext_buffer() -> dict:
        """Where the text engines leave infotext for `get_conds_with_caching` (Emphasis, TI):
        `dynamic_args` on Forge Neo 2.x (whose engine module was renamed in 2.29), else a global of
        classic_engine (Forge main, Neo's October tree, where `dynamic_args` is a dict)."""
        from backend.args import dynamic_args
        buffer = getattr(dynamic_args, "last_extra_generation_params", None)
        if isinstance(buffer, dict):
            return buffer
        import backend.text_processing.classic_engine as classic_engine
        return classic_engine.last_extra_generation_params

    def before_encoding(self, p) -> None:
        p.sd_model.set_clip_skip(int(self.options().CLIP_stop_at_last_layers))

    @staticmethod
    def missing(sampling_function_module=None, patcher_cls=None) -> Optional[str]:
        """Why this backend cannot carry AutoLoRA, or None: the sampling step must run the pre-CFG
        list, `calc_cond_uncond_batch` and `sampler_cfg_function`, and the ModelPatcher must keep
        LoRAs in a layout patcher.py reads (checked on a one-layer patcher)."""
        try:
            if sampling_function_module is None:
                from backend.sampling import sampling_function as sampling_function_module
                from backend.patcher.lora import merge_lora_to_weight  # noqa: F401 - the patch format we read
            if patcher_cls is None:
                from backend.patcher.base import ModelPatcher as patcher_cls
            source = _source(sampling_function_module.sampling_function_inner)
        except (ImportError, AttributeError) as exc:
            return f"its Forge backend lacks what AutoLoRA binds to ({type(exc).__name__}: {exc})"
        missing = [name for name in (PRE_CFG, "calc_cond_uncond_batch(", "sampler_cfg_function") if name not in source]
        if missing:
            return f"its Forge sampling step has no {', '.join(m.rstrip('(') for m in missing)}"
        return missing_convention(patcher_cls)


class LdmPatchedAPI(FamilyAPI):
    """reForge and Forge Classic (`ldm_patched` + `modules_forge`)."""

    step_hook = MODIFIERS
    # reForge keeps the CFG result in last_noise_uncond (the sampled model's already); Classic has none.
    corrects_last_noise_uncond = False

    def __init__(self):
        from ldm_patched.modules import conds, model_management, samplers
        from modules import prompt_parser
        from modules_forge import forge_sampler

        self.calc_cond_uncond_batch = samplers.calc_cond_uncond_batch
        self.compute_cond_mark = getattr(samplers, "compute_cond_mark", None)  # reForge computes none
        self.compute_cond_indices = getattr(samplers, "compute_cond_indices", None)
        self.compile_conditions = forge_sampler.cond_from_a1111_to_patched_ldm
        self.compile_weighted_conditions = forge_sampler.cond_from_a1111_to_patched_ldm_weighted
        self.Condition = conds.CONDRegular
        self.ConditionCrossAttn = conds.CONDCrossAttn
        self.reconstruct_multicond_batch = prompt_parser.reconstruct_multicond_batch
        self.reconstruct_cond_batch = prompt_parser.reconstruct_cond_batch
        self.memory_management = model_management

    def merge_for(self, patcher) -> Callable:
        """reForge: `ldm_patched.modules.lora.calculate_weight(..., intermediate_dtype=)`; Forge
        Classic: the patcher's own `calculate_weight(patches, weight, key)`. Both merge in place."""
        try:
            from ldm_patched.modules.lora import calculate_weight
        except ImportError:
            def merge(patches, weight, key, computation_dtype=torch.float32):
                return patcher.calculate_weight(patches, weight.to(computation_dtype), key)
            return merge

        def merge(patches, weight, key, computation_dtype=torch.float32):
            return calculate_weight(patches, weight, key, intermediate_dtype=computation_dtype)
        return merge

    @staticmethod
    def infotext_buffer() -> dict:
        from modules.sd_hijack import model_hijack
        return model_hijack.extra_generation_params

    def unsupported(self, p) -> Optional[str]:
        if getattr(self.options(), "dynamic_clip_skip_enabled", False):
            return ("AutoLoRA: dynamic CLIP skip changes the conditioning step by step, which AutoLoRA's base "
                    "branch does not follow; generated without AutoLoRA")
        return None

    @staticmethod
    def missing(sampler_module=None, patcher_cls=None, step_function=None) -> Optional[str]:
        """Why this backend cannot carry AutoLoRA, or None: the conditioning modifiers must run
        before its sampling function, which must evaluate the conds with `calc_cond_uncond_batch`
        (or reForge's `calc_cond_batch`) and apply `sampler_cfg_function`; the ModelPatcher must
        keep LoRAs in a layout patcher.py reads."""
        try:
            if sampler_module is None:
                from ldm_patched.modules import samplers as sampler_module
            if patcher_cls is None:
                from ldm_patched.modules.model_patcher import ModelPatcher as patcher_cls
            if step_function is None:
                step_function = _modifier_step()
            sampling = _source(sampler_module.sampling_function) + _source(getattr(sampler_module, "cfg_function", None))
        except (ImportError, AttributeError) as exc:
            return f"its ldm_patched backend lacks what AutoLoRA binds to ({type(exc).__name__}: {exc})"
        if MODIFIERS not in _source(step_function):
            return "its sampler does not run conditioning modifiers before it samples"
        if "sampler_cfg_function" not in sampling or "calc_cond" not in sampling:
            return "its sampling function does not evaluate the conds and apply a CFG function as Forge's does"
        return missing_convention(patcher_cls)


def _modifier_step():
    """The host function that runs the conditioning modifiers: reForge's CFG denoiser, or Forge
    Classic's `forge_sample`."""
    from modules import sd_samplers_cfg_denoiser
    forward = sd_samplers_cfg_denoiser.CFGDenoiser.forward
    if MODIFIERS in _source(forward):
        return forward
    from modules_forge import forge_sampler
    return forge_sampler.forge_sample


def host_api():
    """(the API class of this WebUI's Forge-family backend, or None; why not, when it has one
    that cannot carry AutoLoRA)."""
    import importlib.util

    def has(package):
        return importlib.util.find_spec(package) is not None

    if not has("modules_forge"):
        return None, None
    if has("backend"):
        return ForgeAPI, ForgeAPI.missing()
    if has("ldm_patched"):
        return LdmPatchedAPI, LdmPatchedAPI.missing()
    return None, None
