"""CPU cost of `batched`'s per-layer hook, apart from any GPU: microseconds a LoRA'd Linear adds.

A launch-bound step pays, per LoRA'd layer, the CPU time of the hook's operator calls and of the
hook mechanism. This times N tiny Linears (so the arithmetic is negligible) plain, with an empty
forward hook, with the bare operator calls of the correction (two slices, reshape, mm, view,
addmm_) in a hook, and with `DeltaHooks` as the strategies use it. CPU times of this machine.

    python bench/hook_cost.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib_autolora.base_branch.hooks import DeltaHooks  # noqa: E402
from lib_autolora.factors import LoraFactors, LowRankTerm  # noqa: E402


def per_layer_us(modules, x, reps: int) -> float:
    def run():
        for m in modules:
            m(x)
    run()
    start = time.perf_counter()
    for _ in range(reps):
        run()
    return (time.perf_counter() - start) / reps / len(modules) * 1e6


def main(layers: int = 200, width: int = 16, rank: int = 4, reps: int = 50) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    modules = [torch.nn.Linear(width, width) for _ in range(layers)]
    factors = LoraFactors()
    for i, m in enumerate(modules):
        factors.add(m, f"blocks.{i}.ff", LowRankTerm(torch.randn(rank, width), torch.randn(width, rank), 1.0))
    x = torch.randn(4, 8, width)  # [LoRA rows; base rows], 8 tokens each
    down_t, up_t = torch.randn(rank, width).t(), torch.randn(width, rank).t()

    def bare(_m, args, out):
        h = torch.mm(args[0][2:4].reshape(-1, width), down_t)
        out[2:4].view(-1, width).addmm_(h, up_t, alpha=-1.0)

    result = {}
    with torch.inference_mode():
        result["plain"] = per_layer_us(modules, x, reps)
        for name, hook in (("empty hook", lambda *_: None), ("bare ops in a hook", bare)):
            handles = [m.register_forward_hook(hook) for m in modules]
            result[name] = per_layer_us(modules, x, reps) - result["plain"]
            for h in handles:
                h.remove()
        hooks = DeltaHooks(factors)
        with hooks.rows(4, [(2, 4, -1.0)]):
            result["DeltaHooks"] = per_layer_us(modules, x, reps) - result["plain"]
    for name, us in result.items():
        print(f"{name:20s} {us:6.2f} us per layer{'' if name == 'plain' else ' added'}")
    return result


if __name__ == "__main__":
    main()
