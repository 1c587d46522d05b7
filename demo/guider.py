"""AutoLoRA as a k-diffusion-style denoiser: `guider(x, sigma) -> denoised`.

`model(x, sigma, cond)` is any denoiser that takes a batch (a k-diffusion wrapper around the
LoRA'd model). The guider lives for one generation, like ComfyUI's guiders: it owns the
conditionings of both branches and a `Generation` (the settings, the w1/w2 rule, the schedule and
the cap) whose base-branch strategy is already entered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from lib_autolora.base_branch import Strategy, cat_batches, split_batch
from lib_autolora import step
from lib_autolora.generation import Generation
from lib_autolora.guidance import cfg, step_of_sigma


@dataclass
class BranchConds:
    cond: Any
    uncond: Optional[Any] = None  # None: no uncond pass (CFG 1, guidance-distilled models)


class AutoLoraGuider:
    def __init__(self, model: Callable, strategy: Strategy, settings, *, lora: BranchConds, base: BranchConds,
                 cfg_scale: float, sigmas: Optional[Sequence[float]] = None):
        if (lora.uncond is None) != (base.uncond is None):
            raise ValueError("AutoLoRA: both branches need an uncond, or neither")
        self.model, self.lora, self.base, self.cfg_scale = model, lora, base, float(cfg_scale)
        self.generation = Generation(settings, "k-diffusion")
        self.generation.strategy = strategy  # entered and closed by the caller
        self.sigmas = [float(s) for s in sigmas] if sigmas is not None else None

    @property
    def guided_steps(self) -> int:
        return self.generation.stats.guided_steps

    @property
    def plain_steps(self) -> int:
        return self.generation.stats.plain_steps

    def _step(self, sigma: torch.Tensor) -> tuple:
        """(step, steps) of the sampler's schedule this evaluation belongs to."""
        if self.sigmas is None:
            if not self.generation.interval.is_full or self.generation.settings.schedule != "constant":
                raise ValueError("AutoLoRA: a guidance interval or schedule needs the sampler's sigmas")
            return 0, 1
        return step_of_sigma(float(sigma.reshape(-1)[0]), self.sigmas), len(self.sigmas) - 1

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_):
        gen, n = self.generation, x.shape[0]
        at = step.begin(gen, *self._step(sigma))
        if self.lora.uncond is None:  # no CFG: each branch is its cond prediction
            if at is None:
                return self.model(x, sigma, self.lora.cond)
            lora, base = gen.strategy.evaluate(self.model, (x, sigma, self.lora.cond), (x, sigma, self.base.cond))
            return step.guide(gen, at, lora, base, lambda pred, _scale: pred, self.cfg_scale, uncond_evaluated=False)
        x2, s2 = torch.cat([x, x]), torch.cat([sigma, sigma])
        if at is None:
            return cfg(*split_batch(self.model(x2, s2, cat_batches(self.lora.cond, self.lora.uncond)), n), self.cfg_scale)
        lora_out, base_out = gen.strategy.evaluate(
            self.model,
            (x2, s2, cat_batches(self.lora.cond, self.lora.uncond)),
            (x2, s2, cat_batches(self.base.cond, self.base.uncond)))
        return step.guide(gen, at, lora_out, base_out, lambda pred, scale: cfg(*split_batch(pred, n), scale),
                          self.cfg_scale, lora_uncond=split_batch(lora_out, n)[1])
