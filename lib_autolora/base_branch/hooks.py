"""Forward hooks that add `coef * LoRA term` to chosen rows of each LoRA'd module's output.

The host keeps the LoRA in the model (merged into the weights or applied in its own forward), so
the module output already holds 1x the LoRA term. Rows with coef -1 see the base model; rows with
coef (s - 1) see the LoRA at strength s. Rows are contiguous slices of the batch, set per forward
by a `RowPlan`: a slice is a view, so the correction costs two small matmuls per module, the
second accumulating into the output rows in place (`ModuleDelta.add_into`), and no gather or copy.

Sibling Linears that read the same input (an attention block's to_q/to_k/to_v on x, or to_k/to_v
on the context) share one down projection: the first of them to run computes the concatenated
down for the whole group, the others slice it. Whether the input really is the same is checked
by tensor identity on every call, so a guess that does not hold only costs the shared matmul.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from ..factors import COMPUTE_DTYPES, LoraFactors, ModuleDelta, prepare_deltas


class BatchLayoutError(RuntimeError):
    """A LoRA'd module saw a batch size that the row plan does not describe."""


@dataclass(frozen=True)
class RowPlan:
    batch: int
    groups: tuple  # ((start, stop, coef), ...) with coef != 0


class SharedDown:
    """Concatenated down projections of sibling Linears that may read one input tensor."""

    def __init__(self, members):
        self.members = members  # [(module, delta)]
        self.down = None
        self.down_t = None  # its transpose, a view made once per generation, not per call
        self.slices = {}

    def prepare(self, device, dtype):
        downs, start = [], 0
        for module, delta in self.members:
            if not delta.is_prepared_for(device, dtype):
                delta.prepare(device, dtype)
            (down, _up), = delta._prepared[2]
            downs.append(down)
            self.slices[module] = slice(start, start + down.shape[0])
            start += down.shape[0]
        self.down = torch.cat(downs, 0)
        self.down_t = self.down.t()


def _single_low_rank_linear(delta: ModuleDelta) -> bool:
    from ..factors import LowRankTerm
    if delta.kind != "linear" or not delta.terms:
        return False
    low = [t for t in delta.terms if isinstance(t, LowRankTerm) and t.scale != 0]
    if len(low) != len(delta.terms) or any(t.mid is not None for t in low):
        return False
    return len({tuple(t.down.shape[1:]) for t in low}) == 1


# Attention projections that read one tensor (ldm/sgm/diffusers, and CLIP's text encoder).
SHARED_INPUT_NAMES = ("to_q", "to_k", "to_v", "q_proj", "k_proj", "v_proj")


def shared_down_groups(factors: LoraFactors) -> dict:
    """module -> SharedDown for attention projections with the same parent and in_features."""
    by_parent = {}
    for module, delta in factors.nonzero().items():
        if not _single_low_rank_linear(delta):
            continue
        name = factors.names.get(module, "")
        parent, _, leaf = name.rpartition(".")
        if leaf not in SHARED_INPUT_NAMES:
            continue
        by_parent.setdefault((parent, module.in_features), []).append((module, delta))
    groups = {}
    for members in by_parent.values():
        if len(members) > 1:
            group = SharedDown(members)
            for module, _ in members:
                groups[module] = group
    return groups


class DeltaHooks:
    """Forward hooks on every module in `factors`, registered only while a row plan is set, so
    that steps outside the guidance interval (and the host's other model calls) pay nothing."""

    def __init__(self, factors: LoraFactors, share_down: bool = True):
        self.factors = factors
        self.handles = []
        self.plan: Optional[RowPlan] = None
        self.calls = 0  # module corrections applied, for tests and logs
        self.shared_hits = 0  # down projections served from a sibling's shared matmul
        self._share_down = share_down
        self._hook_fns = None  # built once per generation, registered per planned forward
        self._down_cache = {}

    def _build(self):
        groups = shared_down_groups(self.factors) if self._share_down else {}
        self._hook_fns = [(module, self._make_hook(module, delta, groups.get(module)))
                          for module, delta in self.factors.nonzero().items()]

    def preload(self) -> int:
        """Prepare every hooked module's factors now, for the device and dtype of its weight (what
        the layer computes in on Forge and A1111), in one upload (factors.prepare_deltas), instead
        of layer by layer inside the first forward. A layer that then sees another dtype or device
        (autocast, an offloading mode) prepares again on its first call, as without this."""
        targets = []
        for module, delta in self.factors.nonzero().items():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dtype in COMPUTE_DTYPES:
                targets.append((delta, weight.device, weight.dtype))
        return prepare_deltas(targets)

    def install(self) -> None:
        if self.handles:
            return
        if self._hook_fns is None:
            self._build()
        self.handles = [module.register_forward_hook(fn) for module, fn in self._hook_fns]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.plan = None
        self._down_cache.clear()

    def _make_hook(self, module, delta, group: Optional[SharedDown]):
        name = self.factors.names.get(module, type(module).__name__)
        cache = self._down_cache
        # The hooks reach this object through a weak reference: a strong one would make a cycle
        # (self._hook_fns -> hook -> self) that keeps the factors, gigabytes of dense deltas among
        # them, alive after the generation until the next full garbage collection.
        owner = weakref.ref(self)

        def correct(hooks, out, x_full, x, rows, coef):
            if group is None:
                delta.add_into(out, x, coef)
                return
            if group.down is None or group.down.dtype != x.dtype or group.down.device != x.device:
                group.prepare(x.device, x.dtype)
            key = (id(group), rows.start, rows.stop)
            hit = cache.get(key)
            if hit is not None and hit[0] is x_full:
                h = hit[1]
                hooks.shared_hits += 1
            else:
                h = torch.mm(x.reshape(-1, x.shape[-1]), group.down_t)
                cache[key] = (x_full, h)
            delta.add_into(out, x, coef, down_out=h[:, group.slices[module]])

        def hook(_module, args, output):
            hooks = owner()
            plan = hooks.plan if hooks is not None else None
            if plan is None:
                return None
            x = args[0]
            if plan.batch is not None and x.shape[0] != plan.batch:
                raise BatchLayoutError(
                    f"AutoLoRA: module {name} got a batch of {x.shape[0]} rows, expected {plan.batch}; "
                    f"the host split the batch in a way the base branch cannot follow")
            for start, stop, coef in plan.groups:
                rows = slice(start, stop)
                correct(hooks, output[rows], x, x[rows], rows, coef)
            hooks.calls += 1
            return output

        return hook

    @contextmanager
    def all_rows(self, coef: float):
        """`coef` x the LoRA term on the whole output of every hooked module, whatever its layout:
        for calls that are all one branch, e.g. a text encoder (OpenCLIP's layers see the sequence,
        not the batch, as their first dimension)."""
        with self.rows(None, [(0, None, coef)]):
            yield

    @contextmanager
    def rows(self, batch: Optional[int], groups):
        """Row groups ((start, stop, coef), ...) of a batch of `batch` rows; batch None: no check,
        stop None: to the end."""
        groups = tuple((a, b, float(c)) for a, b, c in groups if c != 0 and (b is None or b > a))
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
