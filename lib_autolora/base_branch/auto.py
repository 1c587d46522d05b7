"""The `auto` strategy rule.

The rule follows the per-step ratios measured on an H100 (fp16, rank-32 LoRA on every
attention / feed-forward / projection Linear; issue 8's table):

| case               | batched hooks | two forwards (swap) |
|--------------------|---------------|---------------------|
| SD1.5 512², 1 img  | 1.40x         | 2.0x                |
| SD1.5 512², 4 img  | 1.57x         | 2.0x                |
| SDXL 1024², 1 img  | 1.86x         | 2.0x                |
| SDXL 1024², 4 img  | 2.21x         | 2.0x                |

Batching both branches wins while the GPU is launch-bound; once a step is compute-bound (about
four SDXL 1024² latents, 4 x 128 x 128 latent pixels per branch) two forwards over swapped
weights win, if a copy of the LoRA'd layers fits in free memory. With a memory-lean request,
`sequential` adds no weights and no batch rows. Functional LoRAs (not merged into the weights)
cannot swap.
"""
from __future__ import annotations

from typing import Optional

COMPUTE_BOUND_LATENT_PIXELS = 4 * 128 * 128


def choose_strategy(requested: str, *, weights_merged: bool = True, lean_memory: bool = False,
                    latent_pixels_per_branch: int = 0, swap_bytes: int = 0,
                    free_bytes: Optional[int] = None, swap_budget_bytes: Optional[int] = None) -> tuple[str, str]:
    """Returns (strategy name, reason) for a request of auto / batched / sequential / swap / toggle."""
    if requested != "auto":
        if requested in ("swap", "toggle") and not weights_merged:
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
