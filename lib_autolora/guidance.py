"""AutoLoRA guidance math (Kasymov et al., 2024, Algorithm 2), host-free.

Every function here is affine in its tensor arguments, so it holds on the WebUI's denoised (x0)
predictions exactly as on eps predictions: the hosts blend whichever they have.

    base_w1 = base_uncond + w1 * (base_cond - base_uncond)    # checkpoint with the LoRAs removed
    lora_w2 = lora_uncond + w2 * (lora_cond - lora_uncond)    # the model as the user loaded it
    out     = base_w1 + gamma * (lora_w2 - base_w1)

The controls around it: a schedule moves gamma's push beyond the plain LoRA over the guided steps,
gamma_t = 1 + (gamma - 1) * (floor + (1 - floor) * ramp(u)), u = 0 at the first guided step and 1
at the last; a cap bounds the push gamma_t * (lora_w2 - base_w1) per image to `cap` times the LoRA
branch's CFG update |lora_w2 - lora_uncond| (the prediction itself where no uncond was evaluated).
The cap's ratio is the same on eps and x0 (both differences scale with sigma).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


def cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return uncond + (cond - uncond) * scale


def blend(base: torch.Tensor, lora: torch.Tensor, gamma: float) -> torch.Tensor:
    """The AutoLoRA step proper: base + gamma * (lora - base)."""
    return base + (lora - base) * gamma


def schedule_weight(schedule: str, progress: float, power: float = 1.0, floor: float = 0.0) -> float:
    """The share of gamma's push at `progress` (0 = first guided step, 1 = the last):
    constant 1; early (1 - u)^p; late u^p; middle (4 u (1 - u))^p; then floor + (1 - floor) * that."""
    u = min(max(float(progress), 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "early":
        ramp = (1.0 - u) ** power
    elif schedule == "late":
        ramp = u ** power
    elif schedule == "middle":
        ramp = (4.0 * u * (1.0 - u)) ** power
    else:
        raise ValueError(f"AutoLoRA: unknown schedule {schedule!r}")
    return floor + (1.0 - floor) * ramp


def scheduled_gamma(gamma: float, weight: float) -> float:
    """gamma with its push beyond the plain LoRA (gamma - 1) scaled by a schedule weight."""
    return 1.0 + (gamma - 1.0) * weight


def capped_push(push: torch.Tensor, reference: torch.Tensor, cap: float) -> torch.Tensor:
    """`push` scaled down, per image (the first dimension), to at most `cap` times |reference|."""
    dims = tuple(range(1, push.ndim))
    limit = cap * torch.linalg.vector_norm(reference.float(), dim=dims, keepdim=True)
    norm = torch.linalg.vector_norm(push.float(), dim=dims, keepdim=True)
    factor = torch.clamp(limit / norm.clamp_min(torch.finfo(torch.float32).tiny), max=1.0)
    return push * factor.to(push.dtype)


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

    def progress(self, step: int, total_steps: int) -> float:
        """Where step `step` of `total_steps` lies among the guided steps: 0 at the first, 1 at the last."""
        if total_steps <= 0:
            return 0.0
        first = math.ceil(self.start * total_steps - 1e-9)
        last = max(first, math.ceil(self.end * total_steps - 1e-9) - 1)
        return 0.0 if last == first else (step - first) / (last - first)

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
