"""What a quick implementation of AutoLoRA's base branch does, kept as the tests' second reference.

Not a strategy users can choose: restoring and re-merging the weights every step is slow by
construction, and every product strategy must equal the never-LoRA'd model without it.
"""
from __future__ import annotations

import torch

from lib_autolora.base_branch import make_strategy
from lib_autolora.base_branch.strategies import Strategy, with_base_strength


class ToggleStrategy(Strategy):
    """Restore the base weights in place, run, put the LoRA'd weights back, each step."""

    name = "toggle"
    needs_merged_weights = True

    @property
    def uses_hooks(self) -> bool:
        return self.lora_scale != 1.0

    def evaluate_base(self, forward, base_args):
        backups = []
        try:
            with torch.no_grad():
                for module, delta in self.factors.nonzero().items():
                    weight, bias = with_base_strength(*self.base_weights(module, delta), module, delta,
                                                      self.base_strength)
                    backups.append((module, module.weight.detach().clone(),
                                    None if bias is None else module.bias.detach().clone()))
                    module.weight.copy_(weight)
                    if bias is not None:
                        module.bias.copy_(bias)
            # Autocast keeps half-precision casts of float32 weights keyed by the tensor, which an
            # in-place copy does not invalidate: without this the base forward reuses LoRA'd casts.
            torch.clear_autocast_cache()
            out = forward(*base_args)
        finally:
            with torch.no_grad():
                for module, weight, bias in backups:
                    module.weight.copy_(weight)
                    if bias is not None:
                        module.bias.copy_(bias)
            torch.clear_autocast_cache()
        self.base_calls += 1
        return out


def make(name: str, factors, lora_scale: float = 1.0, **kwargs) -> Strategy:
    """`make_strategy`, and the oracle by its name "toggle"."""
    if name == "toggle":
        return ToggleStrategy(factors, lora_scale, **kwargs)
    return make_strategy(name, factors, lora_scale, **kwargs)
