"""AutoLoRA guidance math (Kasymov et al., 2024, Algorithm 2), host-free.

Every function here is affine in its tensor arguments, so it holds on the WebUI's denoised (x0)
predictions exactly as on eps predictions: the hosts blend whichever they have.

    base_w1 = base_uncond + w1 * (base_cond - base_uncond)    # checkpoint with the LoRAs removed
    lora_w2 = lora_uncond + w2 * (lora_cond - lora_uncond)    # the model as the user loaded it
    out     = base_w1 + gamma * (lora_w2 - base_w1)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return uncond + (cond - uncond) * scale


def blend(base: torch.Tensor, lora: torch.Tensor, gamma: float) -> torch.Tensor:
    """The AutoLoRA step proper: base + gamma * (lora - base)."""
    return base + (lora - base) * gamma


def autolora(base_cond, base_uncond, lora_cond, lora_uncond, *, gamma: float, w1: float, w2: float):
    """The four-evaluation AutoLoRA + CFG combination."""
    return blend(cfg(base_cond, base_uncond, w1), cfg(lora_cond, lora_uncond, w2), gamma)


def autolora_no_cfg(base_cond, lora_cond, *, gamma: float):
    """The two-evaluation variant for CFG = 1 and guidance-distilled models (no uncond pass).

    It equals `autolora` with w1 = w2 = 1, where the uncond terms cancel.
    """
    return blend(base_cond, lora_cond, gamma)


@dataclass(frozen=True)
class GuidanceInterval:
    """Where in the schedule AutoLoRA runs, as fractions of the sampling steps.

    Step i of n (0-based) is guided when start <= i / n < end; (0, 1) guides every step.
    A model evaluation at sigma belongs to the step whose sigma range [sigmas[i], sigmas[i+1])
    contains it, so second-order samplers' intermediate evaluations follow their step.
    Outside the interval the step is the host's plain LoRA step, with no extra evaluation.
    The bounds are validated with the other settings (lib_autolora.params).
    """

    start: float = 0.0
    end: float = 1.0

    @property
    def is_full(self) -> bool:
        return self.start <= 0.0 and self.end >= 1.0

    def contains_step(self, step: int, total_steps: int) -> bool:
        if self.is_full:
            return True
        if total_steps <= 0:
            return False
        fraction = step / total_steps
        return self.start <= fraction < self.end

    def contains_sigma(self, sigma: float, sigmas: Sequence[float]) -> bool:
        """`sigmas` is the sampler's schedule, n + 1 values ending at (or near) 0."""
        if self.is_full:
            return True
        n = len(sigmas) - 1
        step = step_of_sigma(float(sigma), sigmas)
        return self.contains_step(step, n)


def step_of_sigma(sigma: float, sigmas: Sequence[float]) -> int:
    """Index i of the step with sigmas[i] >= sigma > sigmas[i+1] (relative tolerance 1e-5)."""
    values = [float(s) for s in sigmas]
    for i in range(len(values) - 1):
        upper, lower = values[i], values[i + 1]
        if sigma <= upper * (1 + 1e-5) and sigma > lower * (1 + 1e-5):
            return i
    return 0 if sigma > values[0] else len(values) - 2
