"""AutoLoRA as a k-diffusion-style denoiser: `guider(x, sigma) -> denoised`.

`model(x, sigma, cond)` is any denoiser that takes a batch (a k-diffusion wrapper around the
LoRA'd model). The guider lives for one generation, like ComfyUI's guiders: it owns the
conditionings of both branches and a base-branch strategy that is already entered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .base_branch import Strategy, cat_batches, split_batch
from .guidance import GuidanceInterval, autolora, autolora_no_cfg, cfg


@dataclass
class BranchConds:
    cond: Any
    uncond: Optional[Any] = None  # None: no uncond pass (CFG 1, guidance-distilled models)


class AutoLoraGuider:
    def __init__(self, model: Callable, strategy: Strategy, *, lora: BranchConds, base: BranchConds,
                 gamma: float, w1: float, w2: float, cfg_scale: float,
                 interval: GuidanceInterval = GuidanceInterval(), sigmas: Optional[Sequence[float]] = None):
        if (lora.uncond is None) != (base.uncond is None):
            raise ValueError("AutoLoRA: both branches need an uncond, or neither")
        self.model, self.strategy = model, strategy
        self.lora, self.base = lora, base
        self.gamma, self.w1, self.w2, self.cfg_scale = gamma, w1, w2, cfg_scale
        self.interval = interval
        self.sigmas = [float(s) for s in sigmas] if sigmas is not None else None
        self.guided_steps = 0
        self.plain_steps = 0

    def _active(self, sigma: torch.Tensor) -> bool:
        if self.interval.is_full:
            return True
        if self.sigmas is None:
            raise ValueError("AutoLoRA: a guidance interval needs the sampler's sigmas")
        return self.interval.contains_sigma(float(sigma.reshape(-1)[0]), self.sigmas)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_):
        n = x.shape[0]
        active = self._active(sigma)
        if self.lora.uncond is None:
            if not active:
                self.plain_steps += 1
                return self.model(x, sigma, self.lora.cond)
            self.guided_steps += 1
            lora, base = self.strategy.evaluate(self.model, (x, sigma, self.lora.cond), (x, sigma, self.base.cond))
            return autolora_no_cfg(base, lora, gamma=self.gamma)
        x2, s2 = torch.cat([x, x]), torch.cat([sigma, sigma])
        if not active:
            self.plain_steps += 1
            out = self.model(x2, s2, cat_batches(self.lora.cond, self.lora.uncond))
            cond, uncond = split_batch(out, n)
            return cfg(cond, uncond, self.cfg_scale)
        self.guided_steps += 1
        lora_out, base_out = self.strategy.evaluate(
            self.model,
            (x2, s2, cat_batches(self.lora.cond, self.lora.uncond)),
            (x2, s2, cat_batches(self.base.cond, self.base.uncond)))
        lora_c, lora_u = split_batch(lora_out, n)
        base_c, base_u = split_batch(base_out, n)
        return autolora(base_c, base_u, lora_c, lora_u, gamma=self.gamma, w1=self.w1, w2=self.w2)
