"""Strategy names -> classes, and the one constructor the hosts, the demo and the tests use."""
from __future__ import annotations

from ..factors import LoraFactors
from .dual import DualStrategy
from .strategies import BatchedStrategy, SequentialStrategy, Strategy, SwapStrategy

STRATEGIES = {cls.name: cls for cls in (BatchedStrategy, DualStrategy, SequentialStrategy, SwapStrategy)}


def make_strategy(name: str, factors: LoraFactors, lora_scale: float = 1.0, **kwargs) -> Strategy:
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"AutoLoRA: unknown base-branch strategy {name!r}; "
                         f"choose one of {', '.join(['auto', *STRATEGIES])}") from None
    return cls(factors, lora_scale, **kwargs)
