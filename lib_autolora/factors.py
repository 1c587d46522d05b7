"""What the LoRAs add to one module: low-rank terms or dense deltas, host-free.

A `ModuleDelta` is the sum of the guided LoRAs' contributions to one Linear or Conv2d module.
Low-rank terms (LoRA, LoCon, with optional Tucker mid) keep their factors so that the base branch
can subtract `x @ down.T @ up.T` cheaply; types with no low-rank form (LoHa, LoKr, full, ...) are
carried as an exact dense delta of the weight.

`prepare(device, dtype)` is called once per generation: it casts the factors, folds each term's
scale into its up factor and concatenates same-shaped low-rank terms into one pair, so that the
per-step work is one down and one up product per module whatever the number of LoRAs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F


# Float dtypes a layer computes in; others (fp8 storage) are cast by the host per call.
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The coefficient of the guided LoRAs' terms that the base-branch hooks add to a module's output,
# which already holds them once (the host applied the LoRA): the base branch removes them
# (BASE_COEF; with a base strength b it keeps b of them: b - 1), the LoRA branch at LoRA scale s
# adds s - 1 more.
BASE_COEF = -1.0


def lora_branch_coef(lora_scale: float) -> float:
    return float(lora_scale) - 1.0


def base_branch_coef(base_strength: float = 0.0) -> float:
    return float(base_strength) - 1.0


@dataclass
class LowRankTerm:
    """scale * up @ (mid) @ down; Linear: down (r, in), up (out, r).

    Conv (LoCon): down (r, in, kh, kw) with the module's stride/padding and up (out, r, 1, 1); with a
    Tucker mid, down is (r, in, 1, 1), mid (r, r, kh, kw) carries the spatial kernel.
    `scale` = alpha / rank * strength, as the host applies it.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    mid: Optional[torch.Tensor] = None
    source: str = ""

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def embedded(self, weight_shape, dim: int, start: int) -> "LowRankTerm":
        """This term of a slice of a fused Linear (QKV), on the whole weight: its up factor's rows
        (dim 0) or its down factor's columns (dim 1) placed from `start`, zeros elsewhere. A Linear's
        term only (2-D factors, no Tucker mid)."""
        if self.mid is not None or self.up.ndim != 2 or self.down.ndim != 2:
            raise ValueError("only a Linear's low-rank term without a mid is embedded in a fused layer")
        if dim == 0:
            up = self.up.new_zeros((weight_shape[0], self.up.shape[1]))
            up[start:start + self.up.shape[0]] = self.up
            return LowRankTerm(down=self.down, up=up, scale=self.scale, mid=self.mid, source=self.source)
        down = self.down.new_zeros((self.down.shape[0], weight_shape[1]))
        down[:, start:start + self.down.shape[1]] = self.down
        return LowRankTerm(down=down, up=self.up, scale=self.scale, mid=self.mid, source=self.source)

    def delta_weight(self, device=None) -> torch.Tensor:
        down, up = self.down.to(device=device, dtype=torch.float32), self.up.to(device=device, dtype=torch.float32)
        if down.ndim == 2:
            return (up @ down) * self.scale
        up2 = up.flatten(1)
        if self.mid is not None:
            delta = torch.einsum("or,rskl,si->oikl", up2, self.mid.to(device=device, dtype=torch.float32),
                                 down.flatten(1))
        else:
            delta = (up2 @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        return delta * self.scale


def hadamard_term(w1a, w1b, w2a, w2b, alpha, strength: float, weight_shape) -> LowRankTerm:
    """LoHa, (w1a·w1b) ⊙ (w2a·w2b) · α/r1, as the exact low-rank term it is: a Hadamard product of
    ranks r1 and r2 has rank r1·r2, with the products of the factors' columns (and rows) pairwise
    (Khatri-Rao) as its factors."""
    r1, r2 = w1a.shape[1], w2a.shape[1]
    up = (w1a.float()[:, :, None] * w2a.float()[:, None, :]).reshape(w1a.shape[0], r1 * r2)
    down = (w1b.float()[:, None, :] * w2b.float()[None, :, :]).reshape(r1 * r2, -1)
    if len(weight_shape) == 4:
        up, down = up[:, :, None, None], down.reshape(r1 * r2, *weight_shape[1:])
    scale = float(strength) * (float(alpha) / w1b.shape[0] if alpha is not None else 1.0)
    return LowRankTerm(down=down, up=up, scale=scale)


def kronecker_term(w1, w2a, w2b, alpha, strength: float, weight_shape) -> LowRankTerm:
    """LoKr, kron(W1, A·B) · α/dim, as the exact low-rank term kron(W1, A) · kron(I, B) (Kronecker
    products multiply blockwise): rank (columns of W1) · (rank of A·B). On a convolution the hosts
    compute the same on B's flattened kernels, so the down factor is a block-diagonal kernel."""
    dim = w2b.shape[0]  # the hosts take the second factorisation's rank when both are factorised
    up = torch.kron(w1.float().flatten(1), w2a.float())
    down = torch.kron(torch.eye(up.shape[1] // w2a.shape[1], device=w2b.device), w2b.float().flatten(1))
    if len(weight_shape) == 4:
        up, down = up[:, :, None, None], down.reshape(down.shape[0], *weight_shape[1:])
    scale = float(strength) * (float(alpha) / dim if alpha is not None else 1.0)
    return LowRankTerm(down=down, up=up, scale=scale)


@dataclass
class DenseTerm:
    """An exact dense weight delta (and optional bias delta) for types with no low-rank form."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    source: str = ""

    def delta_weight(self, device=None) -> torch.Tensor:
        return self.weight.to(device=device, dtype=torch.float32)


@dataclass
class ModuleDelta:
    """Sum of every guided LoRA's contribution to one module (nn.Linear or nn.Conv2d)."""

    kind: str  # "linear" or "conv2d"
    terms: list = field(default_factory=list)
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    _prepared: Optional[tuple] = field(default=None, repr=False)
    _pair_t: Optional[tuple] = field(default=None, repr=False)  # see low_rank_pair

    @classmethod
    def for_module(cls, module: torch.nn.Module) -> "ModuleDelta":
        if isinstance(module, torch.nn.Conv2d):
            return cls("conv2d", [], tuple(module.stride), tuple(module.padding),
                       tuple(module.dilation), module.groups)
        if isinstance(module, torch.nn.Linear):
            return cls("linear", [])
        raise TypeError(f"AutoLoRA: LoRA on {type(module).__name__} modules is not supported "
                        f"(only Linear and Conv2d)")

    def add(self, term) -> None:
        self.terms.append(term)
        self._prepared = None

    @property
    def is_zero(self) -> bool:
        return all(isinstance(t, LowRankTerm) and t.scale == 0 for t in self.terms)

    def delta_weight(self, device=None) -> torch.Tensor:
        """The dense weight delta in float32, computed on `device` (default: where the factors
        are; on a GPU the up @ down products of a large layer take microseconds, not milliseconds)."""
        total = None
        for term in self.terms:
            d = term.delta_weight(device)
            total = d if total is None else total + d
        return total

    def delta_bias(self) -> Optional[torch.Tensor]:
        biases = [t.bias.float() for t in self.terms if isinstance(t, DenseTerm) and t.bias is not None]
        return sum(biases) if biases else None

    # -- per-generation preparation -------------------------------------------------------------
    def source_device(self) -> torch.device:
        term = self.terms[0]
        return (term.down if isinstance(term, LowRankTerm) else term.weight).device

    def is_prepared_for(self, device, dtype) -> bool:
        return self._prepared is not None and self._prepared[0] == device and self._prepared[1] == dtype

    def prepare(self, device, dtype) -> None:
        """Cast and fuse the factors once, so the per-step path does no Python-side tensor work."""
        self._set_prepared(device, dtype, *self._build(device, dtype))

    def _build(self, device, dtype) -> tuple:
        fused, spatial, dense = [], [], None
        low = [t for t in self.terms if isinstance(t, LowRankTerm) and t.scale != 0]
        # Terms without a Tucker mid and with equally shaped downs fuse by concatenating ranks.
        plain = [t for t in low if t.mid is None]
        by_shape = {}
        for t in plain:
            by_shape.setdefault(tuple(t.down.shape[1:]), []).append(t)
        for terms in by_shape.values():
            down = torch.cat([t.down.to(device=device, dtype=dtype) for t in terms], 0)
            up = torch.cat([(t.up.float() * t.scale).to(device=device, dtype=dtype) for t in terms], 1)
            fused.append((down, up))
        for t in low:
            if t.mid is not None:
                spatial.append((t.down.to(device=device, dtype=dtype), t.mid.to(device=device, dtype=dtype),
                                (t.up.float() * t.scale).to(device=device, dtype=dtype)))
        dense_terms = [t for t in self.terms if isinstance(t, DenseTerm)]
        if dense_terms:
            # A dense delta is as large as the layer: one term already in place is used as it is.
            w = dense_terms[0].weight if len(dense_terms) == 1 else sum(t.weight.float() for t in dense_terms)
            w = w.to(device=device, dtype=dtype)
            b = self.delta_bias()
            dense = (w, None if b is None else b.to(device=device, dtype=dtype))
        return fused, spatial, dense

    def _set_prepared(self, device, dtype, fused, spatial, dense) -> None:
        self._prepared = (device, dtype, fused, spatial, dense)
        single = self.kind == "linear" and len(fused) == 1 and not spatial and dense is None
        self._pair_t = (fused[0][0].t(), fused[0][1].t()) if single else None

    def release(self) -> None:
        self._prepared = None
        self._pair_t = None

    def low_rank_pair(self, device, dtype) -> Optional[tuple]:
        """(down.T, up.T), prepared for device and dtype, when this delta is one fused low-rank
        term on a Linear (the common LoRA); None for anything else. The transposes are views made
        once per generation, not per call."""
        if not self.is_prepared_for(device, dtype):
            self.prepare(device, dtype)
        return self._pair_t

    def add_into(self, out: torch.Tensor, x: torch.Tensor, alpha: float = 1.0,
                 down_out: Optional[torch.Tensor] = None) -> None:
        """out += alpha * the LoRAs' contribution for input x, in place. `down_out`: x's down
        projection, 2-D (rows * tokens, rank), when a sibling layer already computed it.

        A Linear with one low-rank term runs as mm, then addmm_ straight into `out`: two kernels
        and a handful of dispatcher calls per layer instead of linear, linear and add_ (about
        three times as many), the per-layer cost that counts while a step is launch-bound."""
        pair = self.low_rank_pair(x.device, x.dtype)
        if pair is None:
            out.add_(self.forward(x), alpha=alpha)
            return
        down_t, up_t = pair
        h = down_out if down_out is not None else torch.mm(x.reshape(-1, x.shape[-1]), down_t)
        if out.dtype == h.dtype == up_t.dtype and out.is_contiguous():
            out.view(-1, out.shape[-1]).addmm_(h, up_t, alpha=alpha)
        else:
            # A layer that returns another dtype or a strided view, or autocast (A1111 on a GPU):
            # there mm casts to half but an in-place addmm_ is not autocast and would mix dtypes.
            out.add_(torch.mm(h, up_t).view(out.shape).to(out.dtype), alpha=alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRAs' contribution to the module output for input x (the module's own layout)."""
        if not self.is_prepared_for(x.device, x.dtype):
            self.prepare(x.device, x.dtype)
        _, _, fused, spatial, dense = self._prepared
        out = None
        if self.kind == "linear":
            for down, up in fused:
                y = F.linear(F.linear(x, down), up)
                out = y if out is None else out.add_(y)
            if dense is not None:
                y = F.linear(x, dense[0], dense[1])
                out = y if out is None else out.add_(y)
            return out
        for down, up in fused:
            h = F.conv2d(x, down, None, self.stride, self.padding, self.dilation, self.groups)
            y = F.conv2d(h, up)
            out = y if out is None else out.add_(y)
        for down, mid, up in spatial:
            h = F.conv2d(x, down)
            h = F.conv2d(h, mid, None, self.stride, self.padding, self.dilation)
            y = F.conv2d(h, up)
            out = y if out is None else out.add_(y)
        if dense is not None:
            y = F.conv2d(x, dense[0], dense[1], self.stride, self.padding, self.dilation, self.groups)
            out = y if out is None else out.add_(y)
        return out


def _map_tensors(prepared: tuple, fn) -> tuple:
    fused, spatial, dense = prepared
    return ([(fn(d), fn(u)) for d, u in fused], [(fn(d), fn(m), fn(u)) for d, m, u in spatial],
            None if dense is None else (fn(dense[0]), None if dense[1] is None else fn(dense[1])))


def prepare_deltas(targets) -> int:
    """Prepare many deltas at once: [(delta, device, dtype)]. The factors are cast and fused where
    they are (the host keeps LoRA weights on the CPU), then sent with ONE host-to-device copy per
    device and dtype. Prepared lazily instead, each layer's first call copies its factors on its
    own; a copy from pageable memory blocks until the GPU has caught up, so during the first step's
    forward every LoRA'd layer would wait for the one before it. Returns the deltas prepared."""
    pending = {}
    done = 0
    for delta, device, dtype in targets:
        if delta.is_prepared_for(device, dtype) or not delta.terms:
            continue
        done += 1
        built = delta._build(delta.source_device(), dtype)  # where the factors are (a GPU host keeps them on the CPU)
        if built[2] is not None and torch.device(device) == delta.source_device():
            delta._set_prepared(device, dtype, *built)  # a dense delta is layer-sized: no copy where it is
            continue
        pending.setdefault((device, dtype), []).append((delta, built))
    for (device, dtype), items in pending.items():
        tensors = []
        for _delta, built in items:
            _map_tensors(built, lambda t: tensors.append(t) or t)
        if not tensors:
            continue
        flat = torch.cat([t.reshape(-1) for t in tensors]).to(device)
        pieces = iter([piece.view(t.shape) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)])
        for delta, built in items:
            delta._set_prepared(device, dtype, *_map_tensors(built, lambda _t: next(pieces)))
    return done


@dataclass
class LoraFactors:
    """The guided LoRAs' deltas keyed by module, plus what could not be mapped (for messages)."""

    deltas: dict = field(default_factory=dict)  # torch module -> ModuleDelta
    names: dict = field(default_factory=dict)  # torch module -> its name in the model
    unmatched: list = field(default_factory=list)  # LoRA keys naming modules the model lacks
    skipped: list = field(default_factory=list)  # (key, reason) for unsupported network types

    def add(self, module: torch.nn.Module, name: str, term) -> None:
        delta = self.deltas.get(module)
        if delta is None:
            delta = self.deltas[module] = ModuleDelta.for_module(module)
            self.names[module] = name
        delta.add(term)

    def __len__(self) -> int:
        return len(self.deltas)

    def nonzero(self) -> dict:
        return {m: d for m, d in self.deltas.items() if not d.is_zero}

    def nbytes(self) -> int:
        """The factors' size in float32, as prepared on the device."""
        return sum(t.numel() * 4 for delta in self.deltas.values() for term in delta.terms
                   for t in (getattr(term, name, None) for name in ("down", "up", "mid", "weight", "bias"))
                   if isinstance(t, torch.Tensor))

    def dense_count(self) -> int:
        """Modules carrying a dense delta: each as large as its layer."""
        return sum(any(isinstance(t, DenseTerm) for t in d.terms) for d in self.deltas.values())

    def only(self, modules) -> "LoraFactors":
        keep = set(modules)
        sub = LoraFactors()
        for m, d in self.deltas.items():
            if m in keep:
                sub.deltas[m] = d
                sub.names[m] = self.names[m]
        return sub
