"""Concatenate and split model inputs along the batch dimension, whatever their nesting.

Hosts pass conditioning as tensors (SD1.5), dicts of tensors (SDXL's crossattn/vector, Forge's
model_options-free dicts), lists or None; both branches' inputs have the same structure.
"""
from __future__ import annotations

import torch


def batch_size(tree) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.shape[0]
    if isinstance(tree, dict):
        for v in tree.values():
            n = batch_size(v)
            if n:
                return n
    if isinstance(tree, (list, tuple)):
        for v in tree:
            n = batch_size(v)
            if n:
                return n
    return 0


def cat_batches(a, b):
    """Concatenate two structurally equal inputs along dim 0; non-tensor leaves must be equal."""
    if isinstance(a, torch.Tensor):
        if a.ndim == 0:
            if not torch.equal(a, b):
                raise ValueError("AutoLoRA: cannot batch scalar inputs that differ between branches")
            return a
        return torch.cat([a, b.to(a.device, a.dtype)], 0)
    if isinstance(a, dict):
        if a.keys() != b.keys():
            raise ValueError(f"AutoLoRA: branch inputs differ in keys: {sorted(a)} vs {sorted(b)}")
        return {k: cat_batches(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            raise ValueError("AutoLoRA: branch inputs differ in length")
        return type(a)(cat_batches(x, y) for x, y in zip(a, b))
    if a != b:
        raise ValueError(f"AutoLoRA: cannot batch inputs that differ between branches: {a!r} vs {b!r}")
    return a


def split_batch(tree, n: int):
    """Split at row n: (rows [:n], rows [n:])."""
    if isinstance(tree, torch.Tensor):
        return tree[:n], tree[n:]
    if isinstance(tree, dict):
        parts = {k: split_batch(v, n) for k, v in tree.items()}
        return {k: p[0] for k, p in parts.items()}, {k: p[1] for k, p in parts.items()}
    if isinstance(tree, (list, tuple)):
        parts = [split_batch(v, n) for v in tree]
        return type(tree)(p[0] for p in parts), type(tree)(p[1] for p in parts)
    return tree, tree
