"""The AutoLoRA step: the one place where a step's model predictions become its output.

Every host (the A1111 and Forge bindings, and the k-diffusion guider the demo samples with) calls
`begin` when its sampler asks the model for a step, and, for a guided step, `guide` with the two
branches' predictions in its own layout and its own CFG of one branch (`combine`): AND prompts,
edit strength and another extension's CFG function stay the host's business, the rest is here.

    begin(gen, index, total)                 -> a StepPosition when the step is guided, else None
    guide(gen, at, lora, base, combine, ...) -> base_w1 + γ·(lora_w2 − base_w1), capped, counted
    sampled(gen, at, base, lora)             -> the sampled model's prediction (what CFG++ renoises with)

These are also the only places that count steps (`Generation.stats`). Host-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .generation import Generation
from .guidance import blend, capped_push


@dataclass(frozen=True)
class StepPosition:
    """Where a guided step lies in the sampler's schedule (0-based `index` of `total` steps), and
    the γ AutoLoRA uses there (the hires pass's own, moved by the schedule)."""

    index: int
    total: int
    gamma: float


def begin(gen: Generation, index: int, total: int) -> Optional[StepPosition]:
    """The position of the sampler's step `index` of `total` when AutoLoRA guides it; None (and one
    plain step counted) when it does not."""
    if gen.stopped:
        return None
    if not gen.interval.contains_step(index, total):
        gen.stats.plain_steps += 1
        return None
    return StepPosition(index, total, gen.gamma_at(index, total))


def guide(gen: Generation, at: StepPosition, lora, base, combine: Callable, cfg_scale: float, *,
          uncond_evaluated: bool = True, lora_uncond: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The step's output from the two branches' predictions.

    `combine(predictions, scale)` is the host's CFG of one branch at `scale`; w1 (base) and w2
    (LoRA) follow the generation's CFG scale unless set (`Generation.cfg_scales`). `lora_uncond`:
    the LoRA branch's uncond prediction, the cap's reference (None where none was evaluated)."""
    w1, w2 = gen.cfg_scales(cfg_scale, uncond_evaluated=uncond_evaluated)
    base_w1, lora_w2 = combine(base, w1), combine(lora, w2)
    gen.stats.guided_steps += 1
    gen.count_base_calls()
    if gen.settings.cap is None:
        return blend(base_w1, lora_w2, at.gamma)
    reference = lora_w2 - lora_uncond if lora_uncond is not None else lora_w2
    return base_w1 + capped_push((lora_w2 - base_w1) * at.gamma, reference, gen.settings.cap)


def sampled(at: StepPosition, base: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
    """The prediction of the model AutoLoRA samples for one input of both branches (their uncond
    predictions, or their cond ones): with w1 = w2 = w the step's output is sampled(uncond) +
    w·(sampled(cond) − sampled(uncond)). A sampler's own bookkeeping must see this one: CFG++
    renoises with the unconditional prediction, and only this gives the LoRA's at γ 1 and the
    base model's at γ 0. No cap: it bounds the guidance push, and these are unguided predictions."""
    return blend(base, lora, at.gamma)
