"""A1111's CFG denoiser (modules.sd_samplers_cfg_denoiser.CFGDenoiser) bound to a `Generation`.

`on_cfg_denoiser` (the callback A1111 runs inside `CFGDenoiser.forward`, after it built
x_in/cond/uncond) wraps `denoiser.model_wrap` for this one step with a proxy that runs the
strategy's LoRA and base branches for every model call the host makes (rows tracked by a cursor,
so batch_cond_uncond=False chunks, padded conds and NGMS/skip-early-CFG layouts all follow), and
sets `denoiser.combine_denoised` for this one step: the host's own combine on each branch (so AND
prompts and weights work), then the AutoLoRA blend. Mask blending, live previews and after-CFG
callbacks run unchanged on the blended result. `on_cfg_denoised` unwraps. Steps outside the
guidance interval wrap nothing. Subclassing CFGDenoiser instead would need the samplers to be
re-created, and other extensions patch the same class.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import step
from ...generation import Generation
from ..adapter import model_changed
from .conditioning import LayoutError, RowSource, n_rows, with_text


def checkpoint_key(model):
    info = getattr(model, "sd_checkpoint_info", None)
    return (getattr(info, "filename", None), getattr(info, "title", None), id(model)) if info is not None else id(model)


class StepProxy(torch.nn.Module):
    """Stands in for `denoiser.model_wrap` during one guided step.

    Each call of the host covers consecutive rows of its x_in layout ([cond rows; uncond rows], the
    uncond rows absent on NGMS / skip-early-CFG steps). The proxy runs the strategy on the LoRA rows
    and on the same rows with the base branch's text conditioning, returns the LoRA output to the
    host and keeps the base output for `combine_denoised`.
    """

    def __init__(self, real, denoiser, strategy, base_rows: Optional[RowSource], lora_rows: Optional[RowSource],
                 n_rows: int):
        super().__init__()
        object.__setattr__(self, "real", real)
        object.__setattr__(self, "denoiser", denoiser)
        object.__setattr__(self, "strategy", strategy)
        self.base_rows, self.lora_rows, self.n_rows = base_rows, lora_rows, n_rows
        self.cursor = 0
        self.base_out = None
        self.error: Optional[str] = None
        self.failure: Optional[BaseException] = None  # an exception of AutoLoRA's own evaluation

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "real"), name)

    def forward(self, x, sigma, cond=None, **kwargs):
        real = object.__getattribute__(self, "real")
        k, start = x.shape[0], self.cursor
        self.cursor += k
        if self.error is not None or start + k > self.n_rows:
            self.error = self.error or f"the host made an extra model call (rows {start}..{start + k})"
            return real(x, sigma, cond=cond, **kwargs)
        try:
            base_cond = cond if self.base_rows is None else with_text(cond, self.base_rows.take(start, k))
            lora_cond = cond if self.lora_rows is None else with_text(cond, self.lora_rows.take(start, k))
        except LayoutError as exc:
            self.error = str(exc)
            return real(x, sigma, cond=cond, **kwargs)

        def forward(x_, sigma_, cond_):
            return real(x_, sigma_, cond=cond_, **kwargs)

        try:
            lora_out, base_out = self.strategy.evaluate(forward, (x, sigma, lora_cond), (x, sigma, base_cond))
        except Exception as exc:  # never the WebUI's error: the host's plain step instead
            self.error, self.failure = f"{type(exc).__name__}: {exc}", exc
            return real(x, sigma, cond=cond, **kwargs)
        if self.base_out is None:
            self.base_out = torch.zeros((self.n_rows, *base_out.shape[1:]), device=base_out.device,
                                        dtype=base_out.dtype)
        self.base_out[start:start + k] = base_out
        return lora_out


def unwrap(denoiser) -> None:
    proxy = denoiser._modules.get("model_wrap") if hasattr(denoiser, "_modules") else None
    if isinstance(proxy, StepProxy):
        denoiser.model_wrap = object.__getattribute__(proxy, "real")
    if "combine_denoised" in getattr(denoiser, "__dict__", {}):
        del denoiser.__dict__["combine_denoised"]


def _pad_like_host(denoiser, opts, cond, uncond):
    """The host pads cond/uncond to equal token lengths after the callback; do the same to ours."""
    if cond.shape[1] == uncond.shape[1]:
        return cond, uncond
    saved = denoiser.padded_cond_uncond, denoiser.padded_cond_uncond_v0
    try:
        if getattr(opts, "pad_cond_uncond_v0", False):
            return denoiser.pad_cond_uncond_v0(cond, uncond)
        if getattr(opts, "pad_cond_uncond", False):
            return denoiser.pad_cond_uncond(cond, uncond)
        return cond, uncond
    finally:
        denoiser.padded_cond_uncond, denoiser.padded_cond_uncond_v0 = saved


def on_cfg_denoiser(api, gen: Generation, params_) -> None:
    """script_callbacks.on_cfg_denoiser for the running generation: set up the step if it is
    guided; otherwise nothing."""
    denoiser, state = params_.denoiser, gen.host_state
    unwrap(denoiser)  # a step that raised may have left its proxy
    if gen.stopped or state is None or (state.factors is None and gen.strategy is None):
        return
    p = denoiser.p
    if checkpoint_key(api.shared.sd_model) != state.checkpoint:
        model_changed(gen, p.comment)
        return
    extra = getattr(denoiser.sampler, "sampler_extra_args", None) or {}
    entry = state.pairs.get(id(extra.get("cond")))
    if entry is None or entry[0] is not extra.get("cond"):
        gen.note("AutoLoRA: the sampler's conditioning is not the one prepared for this pass "
                 "(refiner switch or another extension); those steps run without AutoLoRA", p.comment)
        return
    at = step.begin(gen, denoiser.step, denoiser.total_steps or 0)
    if at is None:
        return
    try:
        base_rows, lora_rows = (_rows(api, denoiser, params_, conds) for conds in (entry[1].base, entry[1].lora))
    except LayoutError as exc:
        gen.note(f"AutoLoRA: {exc}; this step runs without AutoLoRA", p.comment)
        return
    if gen.strategy is None:
        state.open_strategy(gen, p, params_.x)
    proxy = StepProxy(denoiser.inner_model, denoiser, gen.strategy, base_rows, lora_rows,
                      n_rows(params_.text_cond) + n_rows(params_.text_uncond))
    denoiser.model_wrap = proxy  # reading inner_model above made model_wrap if the host had reset it
    state.wrapped.append(denoiser)
    denoiser.combine_denoised = _combine(gen, state, denoiser, proxy, at, n_rows(params_.text_cond))


def _rows(api, denoiser, params_, conds) -> Optional[RowSource]:
    """One branch's text conditioning at this step, in the host's row layout (None: the host's)."""
    if conds is None:
        return None
    text_cond, text_uncond = params_.text_cond, params_.text_uncond
    c, u = conds
    c = text_cond if c is None else api.prompt_parser.reconstruct_multicond_batch(c, denoiser.step)[1]
    u = text_uncond if u is None else api.prompt_parser.reconstruct_cond_batch(u, denoiser.step)
    if (c.shape if not isinstance(c, dict) else c["crossattn"].shape) != \
            (text_cond.shape if not isinstance(text_cond, dict) else text_cond["crossattn"].shape):
        raise LayoutError("base conditioning does not match the host's (another extension changed it?)")
    return RowSource(*_pad_like_host(denoiser, api.shared.opts, c, u))


def _base_rows_out(proxy: StepProxy, conds_list, n_cond: int) -> Optional[tuple]:
    """(the base branch's x_out, whether the host skipped the uncond rows), or None when the host
    evaluated rows AutoLoRA cannot account for."""
    if proxy.cursor == proxy.n_rows:
        return proxy.base_out, False
    if proxy.cursor == n_cond:  # NGMS / skip early CFG: the host fakes the uncond rows
        seen = proxy.base_out[:n_cond]
        return torch.cat([seen] + [seen[conds[0][0]:conds[0][0] + 1] for conds in conds_list]), True
    return None


def _combine(gen: Generation, state, denoiser, proxy: StepProxy, at, n_cond: int):
    """`denoiser.combine_denoised` for this one step: the host's own combine of each branch (AND
    prompts and their weights), then the step's output."""
    original = type(denoiser).combine_denoised.__get__(denoiser)
    comment = denoiser.p.comment

    def combine_denoised(x_out, conds_list, uncond, cond_scale):
        unwrap(denoiser)
        if denoiser in state.wrapped:
            state.wrapped.remove(denoiser)
        if proxy.failure is not None:
            gen.fail(proxy.failure, denoiser.step, comment)
            return original(x_out, conds_list, uncond, cond_scale)
        rows = _base_rows_out(proxy, conds_list, n_cond) if proxy.error is None and proxy.base_out is not None else None
        if rows is None:
            gen.note(f"AutoLoRA: {proxy.error or f'the host evaluated {proxy.cursor} of {proxy.n_rows} rows'}; "
                     f"a step ran without AutoLoRA", comment)
            return original(x_out, conds_list, uncond, cond_scale)
        base_x_out, skipped = rows[0].to(x_out.dtype), rows[1]
        if getattr(denoiser, "need_last_noise_uncond", False):
            # DDIM CFG++ renoises with the uncond rows the host kept from x_out (the LoRA branch's,
            # faked from the cond rows where it skipped them): it gets the sampled model's instead,
            # so that γ 1 and 0 give the LoRA's and the base model's CFG++ steps.
            n = uncond.shape[0]
            denoiser.last_noise_uncond = step.sampled(at, base_x_out[-n:], x_out[-n:])
        return step.guide(gen, at, x_out, base_x_out, lambda rows_, scale: original(rows_, conds_list, uncond, scale),
                          cond_scale, uncond_evaluated=not skipped,
                          lora_uncond=None if skipped else x_out[-uncond.shape[0]:])

    return combine_denoised


def on_cfg_denoised(params_):
    """script_callbacks.on_cfg_denoised: the model calls of this step are done; unwrap the model."""
    proxy = getattr(params_, "inner_model", None)
    if isinstance(proxy, StepProxy):
        denoiser = object.__getattribute__(proxy, "denoiser")
        if denoiser._modules.get("model_wrap") is proxy:
            denoiser.model_wrap = object.__getattribute__(proxy, "real")
