"""The `dual` strategy: both branches in one forward, each LoRA'd Linear with two weights.

`batched` runs [LoRA rows; base rows] through the model once and lets forward hooks subtract the
LoRA term from the base rows: two small matmuls and a few more kernel launches per LoRA'd layer,
which cost the most while a step is launch-bound (one image on a big GPU).
`dual` keeps the base weight of every LoRA'd Linear on the device for the generation and, for the
fused forward only, runs the layer as the host would, once per half: a Linear with a bias as two
`addmm` (the bias added in the GEMM's epilogue), each writing its half of one output; one without
a bias as one batched matmul (bmm) of [LoRA rows; base rows] against a [W_lora; W_base] stack.
The price is memory: one copy of the biased LoRA'd Linears (their LoRA half reads the host's own
weight) and two of the others (the stack). In Forge it was the fastest strategy at one SD1.5
image on an H200 and an H100 (README, "Speed and memory on a GPU"); `auto` picks it there when it
fits.

Layers that cannot run that way (convolutions such as SD1.5's proj_in/out, weights the host casts
per call, uneven halves) keep the `batched` hooks, so `dual` is never less correct than `batched`.
The host's module stays as it was: its `forward` is shadowed by an instance attribute during the
fused forward only, and the shadow is removed afterwards whatever happens.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..factors import COMPUTE_DTYPES, lora_branch_coef
from .batching import batch_size, cat_batches, split_batch
from .hooks import BatchLayoutError, DeltaHooks
from .strategies import BatchedStrategy, with_base_strength


def dual_eligible(module, delta) -> bool:
    """A Linear whose weight the host uses as stored: no per-call cast, scale or online patch."""
    weight = getattr(module, "weight", None)
    return (delta.kind == "linear" and isinstance(weight, torch.Tensor) and weight.ndim == 2
            and weight.dtype in COMPUTE_DTYPES
            and not getattr(module, "parameters_manual_cast", False)  # Forge: weights cast per call
            and getattr(module, "scale_weight", None) is None  # Forge: fp8 scaled weights
            and getattr(module, "forge_online_loras", None) is None)  # Forge: LoRA applied per call


class DualStrategy(BatchedStrategy):
    name = "dual"
    needs_merged_weights = True

    # The Linears below read their own weights; only the convolutions left to `rest_hooks` (and
    # the fallbacks) use the factors, so only those are uploaded up front.
    @property
    def uses_hooks(self) -> bool:
        return False

    def __enter__(self):
        super().__enter__()
        self._stacks = {}  # module -> (weights, (bias_lora, bias_base) or None); see _make_forward
        with torch.no_grad():
            for module, delta in self.factors.nonzero().items():
                if not dual_eligible(module, delta):
                    continue
                # base_weights first: on A1111 it runs the host's own merge for this generation.
                base_w, base_b = with_base_strength(*self.base_weights(module, delta), module, delta,
                                                    self.base_strength)
                lora_w = module.weight.detach()  # the host's tensor, read only
                if self.lora_scale != 1.0:
                    lora_w = (lora_w.float() + (lora_branch_coef(self.lora_scale)) * delta.delta_weight(lora_w.device)
                              ).to(lora_w.dtype)
                base_w = base_w.to(lora_w.device, lora_w.dtype)
                bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
                if bias is None:
                    self._stacks[module] = (torch.stack([lora_w, base_w]), None)
                else:
                    base_bias = base_b.to(bias.device, bias.dtype) if base_b is not None else bias
                    self._stacks[module] = ((lora_w, base_w), (bias.to(lora_w.dtype).contiguous(),
                                                               base_bias.to(lora_w.dtype).contiguous()))
        rest = [m for m in self.factors.nonzero() if m not in self._stacks]
        self.rest_hooks = DeltaHooks(self.factors.only(rest))
        self.rest_hooks.preload()
        # Built once per generation; a step only puts them in the modules' __dict__ and takes
        # them out again (per-step Python work multiplies by ~1000 layers on SDXL).
        self._rows = 0
        self._forwards = {module: self._make_forward(module, weights, biases)
                          for module, (weights, biases) in self._stacks.items()}
        return self

    def __exit__(self, *exc):
        self._stacks = {}
        self._forwards = {}
        if getattr(self, "rest_hooks", None) is not None:  # absent when __enter__ failed before it
            self.rest_hooks.remove()
        return super().__exit__(*exc)

    @property
    def dual_modules(self) -> int:
        return len(self._stacks)

    def evaluate(self, forward, lora_args, base_args):
        n_lora, n_base = batch_size(lora_args), batch_size(base_args)
        if n_lora != n_base or not self._stacks:
            return super().evaluate(forward, lora_args, base_args)
        args = tuple(cat_batches(a, b) for a, b in zip(lora_args, base_args))
        total = n_lora + n_base
        plan = [(0, n_lora, lora_branch_coef(self.lora_scale)), (n_lora, total, self.base_coef)]
        with self.rest_hooks.rows(total, plan), \
                self._shadowed_forwards(total):
            out = forward(*args)
        self.base_calls += 1
        return split_batch(out, n_lora)

    @contextmanager
    def _shadowed_forwards(self, total: int):
        # An instance attribute `forward` shadows the class's (and the host's patch of it) for
        # this one forward; a forward the host had put on the instance itself is put back.
        shadowed = []
        self._rows = total
        try:
            for module, fn in self._forwards.items():
                shadowed.append((module, module.__dict__.get("forward")))
                module.__dict__["forward"] = fn
            yield
        finally:
            for module, previous in shadowed:
                if previous is None:
                    del module.__dict__["forward"]
                else:
                    module.__dict__["forward"] = previous

    def _make_forward(self, module, weights, biases):
        """weights: a [2, out, in] stack (no bias: one bmm) or (W_lora, W_base) (with biases: two
        addmm)."""
        name = self.factors.names.get(module, type(module).__name__)
        if biases is None:
            weights_t = weights.transpose(1, 2)  # [2, in, out]: a strided view, bmm reads it as is
        else:
            lora_t, base_t = weights[0].t(), weights[1].t()
        n_out, device, dtype = weights[0].shape[0], weights[0].device, weights[0].dtype
        delta = self.factors.deltas[module]
        host_forward = type(module).forward
        lora_coef = lora_branch_coef(self.lora_scale)

        def forward(x, *args, **kwargs):
            total = self._rows
            if x.shape[0] != total:
                raise BatchLayoutError(
                    f"AutoLoRA: module {name} got a batch of {x.shape[0]} rows, expected {total}; "
                    f"the host split the batch in a way the base branch cannot follow")
            if x.device != device:
                # The host moved the layer's input elsewhere (an offloading mode): compute as the
                # host does and correct the rows, as `batched` would.
                half = total // 2
                out = host_forward(module, x, *args, **kwargs)
                delta.add_into(out[half:], x[half:], self.base_coef)
                if lora_coef:
                    delta.add_into(out[:half], x[:half], lora_coef)
                return out
            rows = x.reshape(-1, x.shape[-1])
            if rows.dtype != dtype:
                rows = rows.to(dtype)
            if biases is None:
                y = torch.bmm(rows.reshape(2, -1, rows.shape[-1]), weights_t)
            else:
                # Two matmuls, each with its bias added in the GEMM's epilogue and written straight
                # into its half of one output: a baddbmm would first copy the broadcast biases into
                # the whole output and read it back, two passes over the largest tensor of the
                # layer (+10 ms of elementwise kernels per SDXL step on an H100, bench/step_ops.py).
                half = rows.shape[0] // 2
                y = torch.empty(rows.shape[0], n_out, dtype=dtype, device=device)
                torch.addmm(biases[0], rows[:half], lora_t, out=y[:half])
                torch.addmm(biases[1], rows[half:], base_t, out=y[half:])
            y = y.reshape(*x.shape[:-1], n_out)
            return y if y.dtype == x.dtype else y.to(x.dtype)

        return forward
