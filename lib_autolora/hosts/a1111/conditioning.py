"""The base branch's text conditioning on A1111, and its rows in the host's batch layout.

The host's prompt_parser functions are called the way `p.setup_conds` calls them, on a model
wrapper (`EncodeWith`) whose `get_learned_conditioning` runs with forward hooks that subtract the
guided LoRAs from the text encoder(s); MultiheadAttention layers, which the Lora extension always
merges, get their base weights swapped in by reference for the call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...text_encoding import branch_encodings, encode_finite, not_finite_notice
from .factors import MhaSwap


class EncodeWith:
    """A stand-in for the model passed to prompt_parser: its get_learned_conditioning runs the real
    one with the guided LoRAs at `coef` in the text encoder(s) (BASE_COEF removes them)."""

    def __init__(self, model, hooks, mha_swap: MhaSwap, coef: float):
        self.model, self.hooks, self.mha_swap, self.coef = model, hooks, mha_swap, coef
        self.calls = 0

    def get_learned_conditioning(self, texts):
        self.calls += 1
        with self.mha_swap.swapped(self.coef), self.hooks.all_rows(self.coef):
            return self.model.get_learned_conditioning(texts)

    def __getattr__(self, name):
        return getattr(self.model, name)


@dataclass
class CondPair:
    """A pass's text conditioning for the branches that differ from the host's: each a pair
    (MulticondLearnedConditioning, uncond schedules) whose None members are the host's own."""

    base: Optional[tuple] = None
    lora: Optional[tuple] = None  # the LoRA branch at LoRA scale != 1


def pass_prompts(p, hires: bool, find_sampler_config) -> tuple:
    """(prompts, negative prompts, width, height, steps, hires steps) as p.setup_conds /
    p.calculate_hr_conds use them for the first or the hires pass."""
    if hires:
        config = find_sampler_config(p.hr_sampler_name or p.sampler_name)
        steps = p.hr_second_pass_steps or p.steps
        return (p.hr_prompts, p.hr_negative_prompts, p.hr_upscale_to_x, p.hr_upscale_to_y, p.firstpass_steps,
                config.total_steps(steps) if config else steps)
    config = find_sampler_config(p.sampler_name)
    return (p.prompts, p.negative_prompts, p.width, p.height, config.total_steps(p.steps) if config else p.steps,
            None)


def encode_pass(api, model, gen, hooks, mha_swap, prompts, negatives, width, height, steps, hires_steps,
                comment=None) -> CondPair:
    """The base (and LoRA-scale) conditioning of one pass's prompts, with the host's functions."""
    opts, prompt_parser = api.shared.opts, api.prompt_parser

    def encode(coef):
        wrapper = EncodeWith(model, hooks, mha_swap, coef)
        c_prompts = prompt_parser.SdConditioning(prompts, width=width, height=height)
        n_prompts = prompt_parser.SdConditioning(negatives, width=width, height=height, is_negative_prompt=True)
        with api.devices.autocast():
            uc = encode_finite(lambda: prompt_parser.get_learned_conditioning(
                wrapper, n_prompts, steps, hires_steps, opts.use_old_scheduling), opts, negatives)
            c = encode_finite(lambda: prompt_parser.get_multicond_learned_conditioning(
                wrapper, c_prompts, steps, hires_steps, opts.use_old_scheduling), opts, prompts)
        gen.stats.te_base_encodes += 1
        for result, negative in ((c, False), (uc, True)):
            if result is None:
                gen.note(not_finite_notice(negative), comment)
        return c, uc

    base, lora = branch_encodings(gen.settings, encode)
    return CondPair(base=base, lora=lora)


# -- rows of conditioning ---------------------------------------------------------------------------

def subscript(cond, a, b):
    return {k: v[a:b] for k, v in cond.items()} if isinstance(cond, dict) else cond[a:b]


def catenate(parts):
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def n_rows(cond) -> int:
    return (cond["crossattn"] if isinstance(cond, dict) else cond).shape[0]


class RowSource:
    """The rows of one branch's text conditioning in the host's x_in layout: the cond rows
    (one per AND sub-prompt) followed by the uncond rows."""

    def __init__(self, cond, uncond):
        self.parts = [(cond, n_rows(cond)), (uncond, n_rows(uncond))]
        self.n_cond, self.n_uncond = self.parts[0][1], self.parts[1][1]

    def take(self, start: int, k: int):
        pieces, pos = [], 0
        for part, n in self.parts:
            a, b = max(start, pos), min(start + k, pos + n)
            if a < b:
                pieces.append(subscript(part, a - pos, b - pos))
            pos += n
        if not pieces:
            raise LayoutError(f"rows {start}..{start + k} beyond the {pos} rows of conditioning")
        try:
            return catenate(pieces)
        except RuntimeError as exc:  # cond and uncond of different token lengths in one call
            raise LayoutError(f"cannot join cond and uncond rows {start}..{start + k}: {exc}") from None


class LayoutError(RuntimeError):
    """The host called the model with rows the AutoLoRA step cannot map to conditioning."""


def with_text(cond: dict, text_rows):
    """The host's model cond dict with its text conditioning replaced by `text_rows`."""
    new = dict(cond)
    if "c_crossattn" in cond:
        old = cond["c_crossattn"][0]
        if isinstance(text_rows, dict) or old.shape != text_rows.shape:
            raise LayoutError(f"text conditioning of shape {tuple(old.shape)} vs "
                              f"{tuple(text_rows.shape) if not isinstance(text_rows, dict) else 'dict'}")
        new["c_crossattn"] = [text_rows.to(old.device, old.dtype)]
        return new
    if not isinstance(text_rows, dict):
        raise LayoutError(f"the host's cond has keys {sorted(cond)}, no c_crossattn")
    for key, value in text_rows.items():
        if key not in cond:
            raise LayoutError(f"the host's cond lacks {key!r}")
        if cond[key].shape != value.shape:
            raise LayoutError(f"{key} of shape {tuple(cond[key].shape)} vs {tuple(value.shape)}")
        new[key] = value.to(cond[key].device, cond[key].dtype)
    return new
