"""What a guided step costs on the CPU side, counted: operator calls through torch's dispatcher
per guided model evaluation, per strategy, on the tiny model (the hermetic twin of
bench/step_ops.py, which counts them in a running WebUI on a GPU). A launch-bound step's time is
the sum of these calls, so a change that adds calls per LoRA'd layer shows here as a count, on
any machine, without timing anything.

Budgets, per LoRA'd layer and guided evaluation, over the host's own work (one forward of both
branches' rows for the one-forward strategies, two forwards for the others), measured when they
were set and kept as the bound a change may not exceed:
- batched: a down and an up product per layer, the up accumulating in place, plus the row views;
- dual: Linears run both halves in one call, only convolutions keep batched's hooks;
- swap: swapping weights by reference costs no operator call at all;
- sequential: batched's hook work on every row of the second forward.
"""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import lora_state_dict, make_model, merged_copy
from lib_autolora.base_branch import make_strategy
from demo.kohya import factors_from_kohya

BUDGET_PER_LAYER = {"batched": 6.0, "dual": 4.5, "swap": 0.2, "sequential": 6.0}
ONE_FORWARD = {"batched", "dual"}


class CountCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.calls.values())


@pytest.fixture(scope="module")
def unet_setup():
    clean = make_model(0)
    sd = lora_state_dict(clean, seed=1)
    merged = merged_copy(0, [(sd, 1.0)])
    factors = factors_from_kohya(sd, merged.kohya_modules())
    text_encoder = set(merged.text_encoder.modules())
    unet = factors.only([m for m in factors.deltas if m not in text_encoder])
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 1, 8, 8, generator=g), torch.full((2,), 1.0), torch.randn(2, 4, 32, generator=g))
    return merged, unet, args


def _host_calls(model, args, doubled: bool) -> int:
    with torch.no_grad(), CountCalls() as count:
        model.denoiser(*(torch.cat([a, a]) for a in args) if doubled else args)
    return count.total


@pytest.mark.parametrize("name", sorted(BUDGET_PER_LAYER))
def test_operator_calls_per_guided_evaluation_stay_within_the_budget(unet_setup, name):
    merged, unet, args = unet_setup
    layers = len(unet.nonzero())
    assert layers > 20
    host = _host_calls(merged, args, doubled=True) if name in ONE_FORWARD else 2 * _host_calls(merged, args, False)
    with torch.no_grad(), make_strategy(name, unet) as strategy:
        strategy.evaluate(merged.denoiser, args, args)  # the first call may prepare; steps after it are what count
        with CountCalls() as count:
            strategy.evaluate(merged.denoiser, args, args)
    extra = (count.total - host) / layers
    assert extra <= BUDGET_PER_LAYER[name], (
        f"{name}: {extra:.2f} operator calls per LoRA'd layer over the host's own work "
        f"(budget {BUDGET_PER_LAYER[name]}); most called: {count.calls.most_common(8)}")
