"""Ways to evaluate the base model (every guided LoRA removed) while the host keeps the LoRA in.

Each strategy is a context manager that lives for one generation:

    with make_strategy("batched", factors, lora_scale=1.0) as branch:
        lora_out, base_out = branch.evaluate(forward, lora_args, base_args)   # per model call

`forward(*args)` is the host's model call; args are positional inputs with the batch first.
On exit (success, exception or interrupt) every hook is removed and every weight is the very
tensor it was before, bit for bit.

| strategy   | base rows computed by                                  | cost per step           | extra memory        |
|------------|--------------------------------------------------------|-------------------------|---------------------|
| batched    | one forward of [LoRA rows; base rows], hooks on base   | one bigger forward      | activations only    |
| sequential | a second forward with hooks subtracting on every row   | two forwards            | none                |
| swap       | a second forward over base weights swapped by reference| two forwards, no hooks  | one copy of LoRA'd layers |
| dual       | one forward; each LoRA'd Linear runs each half   | one bigger forward      | LoRA'd Linears      |
|            | against its own weight (dual.py)                       |                         |                     |

`make_strategy` and the name -> class table live in registry.py.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..factors import LoraFactors, base_branch_coef, lora_branch_coef
from .batching import batch_size, cat_batches, split_batch
from .hooks import DeltaHooks


class StrategyUnavailable(RuntimeError):
    """The strategy cannot run in this host configuration (e.g. swap with a functional LoRA)."""


def with_base_strength(weight, bias, module, delta, base_strength: float):
    """The base weights (LoRA-free) with `base_strength` of the guided LoRAs added back."""
    if not base_strength:
        return weight, bias
    weight = (weight.float() + base_strength * delta.delta_weight(weight.device)).to(weight.dtype)
    bias_delta = delta.delta_bias()
    if bias is not None and bias_delta is not None:
        bias = (bias.float() + base_strength * bias_delta.to(bias.device)).to(bias.dtype)
    return weight, bias


def base_weights_by_subtraction(module, delta):
    """W - ΔW in float32, cast back: the base weight when the host gives no exact backup."""
    weight = (module.weight.detach().float() - delta.delta_weight(module.weight.device)).to(module.weight.dtype)
    bias = None
    bias_delta = delta.delta_bias()
    if bias_delta is not None and module.bias is not None:
        bias = (module.bias.detach().float() - bias_delta.to(module.bias.device)).to(module.bias.dtype)
    return weight, bias


class Strategy:
    name = "base"
    needs_merged_weights = False
    fuses_branches = False

    def __init__(self, factors: LoraFactors, lora_scale: float = 1.0, *,
                 weights_merged: bool = True,
                 base_weights: Optional[Callable] = None, base_strength: float = 0.0):
        self.factors = factors
        self.lora_scale = float(lora_scale)
        self.base_strength = float(base_strength)  # the guided LoRAs' share kept in the base branch
        self.base_coef = base_branch_coef(base_strength)
        self.weights_merged = weights_merged
        self.base_weights = base_weights or base_weights_by_subtraction
        self.hooks = DeltaHooks(factors)
        self.base_calls = 0  # base-branch evaluations, for tests and the extension's log
        if self.needs_merged_weights and not weights_merged:
            raise StrategyUnavailable(
                f"AutoLoRA: the '{self.name}' strategy needs the LoRA merged into the weights, "
                f"but the host applies it in the forward pass")

    # Whether the hooks run in this generation: the strategies that compute the base branch from
    # weights use them only for a LoRA scale other than 1.
    @property
    def uses_hooks(self) -> bool:
        return True

    def __enter__(self):
        if self.uses_hooks:
            self.hooks.preload()
        return self

    def __exit__(self, *exc):
        self.hooks.remove()
        for delta in self.factors.deltas.values():
            delta.release()
        return False

    # The LoRA branch at strength s: the host gives 1x, hooks add (s - 1)x.
    def lora_forward(self, forward, args):
        n = batch_size(args)
        with self.hooks.rows(n, [(0, n, lora_branch_coef(self.lora_scale))]):
            return forward(*args)

    def evaluate(self, forward, lora_args: tuple, base_args: tuple):
        lora_out = self.lora_forward(forward, lora_args)
        return lora_out, self.evaluate_base(forward, base_args)

    def evaluate_base(self, forward, base_args: tuple):
        raise NotImplementedError


class BatchedStrategy(Strategy):
    name = "batched"
    fuses_branches = True  # hosts give it both branches' rows in one call (evaluate)

    def evaluate(self, forward, lora_args, base_args):
        n_lora, n_base = batch_size(lora_args), batch_size(base_args)
        args = tuple(cat_batches(a, b) for a, b in zip(lora_args, base_args))
        with self.hooks.rows(n_lora + n_base, [(0, n_lora, lora_branch_coef(self.lora_scale)),
                                               (n_lora, n_lora + n_base, self.base_coef)]):
            out = forward(*args)
        self.base_calls += 1
        return split_batch(out, n_lora)

    def evaluate_base(self, forward, base_args):
        return SequentialStrategy.evaluate_base(self, forward, base_args)


class SequentialStrategy(Strategy):
    name = "sequential"

    def evaluate_base(self, forward, base_args):
        n = batch_size(base_args)
        with self.hooks.rows(n, [(0, n, self.base_coef)]):
            out = forward(*base_args)
        self.base_calls += 1
        return out


class SwapStrategy(Strategy):
    """Base weights kept on the device for the whole generation and swapped in by reference."""

    name = "swap"
    needs_merged_weights = True

    @property
    def uses_hooks(self) -> bool:
        return self.lora_scale != 1.0

    def __enter__(self):
        super().__enter__()
        self._base = {}
        with torch.no_grad():
            for module, delta in self.factors.nonzero().items():
                weight, bias = with_base_strength(*self.base_weights(module, delta), module, delta, self.base_strength)
                self._base[module] = (torch.nn.Parameter(weight, requires_grad=False),
                                      None if bias is None else torch.nn.Parameter(bias, requires_grad=False))
        return self

    def __exit__(self, *exc):
        self._base = {}
        return super().__exit__(*exc)

    def evaluate_base(self, forward, base_args):
        saved = []
        try:
            for module, (weight, bias) in self._base.items():
                saved.append((module, module._parameters["weight"], module._parameters.get("bias")))
                module._parameters["weight"] = weight
                if bias is not None:
                    module._parameters["bias"] = bias
            out = forward(*base_args)
        finally:
            for module, weight, bias in saved:
                module._parameters["weight"] = weight
                if "bias" in module._parameters:
                    module._parameters["bias"] = bias
        self.base_calls += 1
        return out
