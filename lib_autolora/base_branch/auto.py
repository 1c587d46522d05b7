"""The `auto` strategy rule, checked against the GPU table in the README (issue 8).

Whole-image time over plain LoRA generation in Forge on an NVIDIA H200 (2026-11-26, run 1, fp16,
20 Euler steps, rank-32 LoRA on every attention / feed-forward / projection layer):

| case                 | batched | dual  | swap  | sequential | toggle |
|----------------------|---------|-------|-------|------------|--------|
| SD1.5 512², 1 image  | 2.03x   | 1.82x | 1.85x | 2.43x      | 4.54x  |
| SDXL 1024², 1 image  | 2.41x   | 2.74x | 2.63x | 3.03x      | 10.55x |
| SDXL 1024², 4 images | -       | 2.11x | 1.94x | 2.06x      | -      |

One forward of both branches (`batched`) is best or level while a step is launch-bound (one
image; at SD1.5 the three one-forward/swap variants are within the run's noise, run 2 gave
batched 1.74x = dual 1.74x); `dual` costs +34 % (SD1.5) / +93 % (SDXL) peak memory for no
measured gain, so auto does not pick it. Once a step is compute-bound (four SDXL 1024² latents,
4 x 128 x 128 latent pixels per branch) two forwards over swapped weights win, if a copy of the
LoRA'd layers fits in free memory. A memory-lean request gets `sequential` (+1 to +2 % peak).
Functional LoRAs (not merged into the weights) cannot swap.
"""
from __future__ import annotations

from typing import Optional

COMPUTE_BOUND_LATENT_PIXELS = 4 * 128 * 128


def choose_strategy(requested: str, *, weights_merged: bool = True, lean_memory: bool = False,
                    latent_pixels_per_branch: int = 0, swap_bytes: int = 0,
                    free_bytes: Optional[int] = None, swap_budget_bytes: Optional[int] = None) -> tuple[str, str]:
    """Returns (strategy name, reason) for a request of auto / batched / dual / sequential / swap / toggle.

    swap_bytes: bytes of one copy of the LoRA'd layers; free_bytes: free device memory (None:
    unknown); swap_budget_bytes: the user's cap on extra weight memory."""
    if requested != "auto":
        if requested in ("swap", "toggle", "dual") and not weights_merged:
            return "batched", (f"'{requested}' needs merged LoRA weights but the host applies the LoRA "
                               f"in the forward pass; using 'batched'")
        return requested, "as requested"
    if lean_memory:
        return "sequential", "memory-lean: no extra weights, no extra batch rows"
    if latent_pixels_per_branch >= COMPUTE_BOUND_LATENT_PIXELS and weights_merged:
        room = free_bytes if free_bytes is not None else 0
        if swap_budget_bytes is not None:
            room = min(room, swap_budget_bytes) if free_bytes is not None else swap_budget_bytes
        if swap_bytes and room >= swap_bytes:
            return "swap", "compute-bound step and the base weights fit in memory"
    return "batched", "launch-bound step: both branches in one forward"
