"""Forward hooks that add `coef * LoRA term` to chosen rows of each LoRA'd module's output.

The host keeps the LoRA in the model (merged into the weights or applied in its own forward), so
the module output already holds 1x the LoRA term. Rows with coef -1 see the base model; rows with
coef (s - 1) see the LoRA at strength s. Rows are contiguous slices of the batch, set per forward
by a `RowPlan`: a slice is a view, so the correction costs two small matmuls per module and no
gather or copy.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from ..factors import LoraFactors


class BatchLayoutError(RuntimeError):
    """A LoRA'd module saw a batch size that the row plan does not describe."""


@dataclass(frozen=True)
class RowPlan:
    batch: int
    groups: tuple  # ((start, stop, coef), ...) with coef != 0


class DeltaHooks:
    """Forward hooks on every module in `factors`, registered only while a row plan is set, so
    that steps outside the guidance interval (and the host's other model calls) pay nothing."""

    def __init__(self, factors: LoraFactors):
        self.factors = factors
        self.handles = []
        self.plan: Optional[RowPlan] = None
        self.calls = 0  # module corrections applied, for tests and logs

    def install(self) -> None:
        if self.handles:
            return
        for module, delta in self.factors.nonzero().items():
            self.handles.append(module.register_forward_hook(self._make_hook(module, delta)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.plan = None

    def _make_hook(self, module, delta):
        name = self.factors.names.get(module, type(module).__name__)

        def hook(_module, args, output):
            plan = self.plan
            if plan is None:
                return None
            x = args[0]
            if x.shape[0] != plan.batch:
                raise BatchLayoutError(
                    f"AutoLoRA: module {name} got a batch of {x.shape[0]} rows, expected {plan.batch}; "
                    f"the host split the batch in a way the base branch cannot follow")
            for start, stop, coef in plan.groups:
                rows = slice(start, stop)
                output[rows].add_(delta.forward(x[rows]), alpha=coef)
            self.calls += 1
            return output

        return hook

    @contextmanager
    def rows(self, batch: int, groups):
        groups = tuple((a, b, float(c)) for a, b, c in groups if c != 0 and b > a)
        if not groups:
            yield
            return
        if self.plan is not None:
            raise RuntimeError("AutoLoRA: nested base-branch evaluations are not supported")
        self.plan = RowPlan(batch, groups)
        try:
            self.install()
            yield
        finally:
            self.remove()
