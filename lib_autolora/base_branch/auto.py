"""The `auto` strategy rule: which base-branch strategy a generation gets.

- Functional LoRAs (applied in the forward pass, not merged) can neither swap nor stack weights:
  `batched`.
- A memory-lean request (Forge's low-VRAM states, or the user's choice): `sequential`.
- One SD1.5-sized latent (up to 64 x 64 latent pixels per branch) is launch-bound on a GPU: `dual`,
  which runs each LoRA'd Linear of both branches without hooks, when free memory holds two copies
  of the LoRA'd layers.
- From four SDXL-sized latents (4 x 128 x 128) a step is compute-bound: two forwards over swapped
  weights (`swap`), when one copy fits.
- Otherwise `batched`: both branches in one forward, no extra weights (one SDXL image: `dual` was
  at best level with it in the measurements, for far more memory). Free memory unknown: no extra
  weights.

The measurements behind the thresholds (Forge on H100 and H200 GPUs) are in docs/gpu.md.
"""
from __future__ import annotations

from typing import Optional

COMPUTE_BOUND_LATENT_PIXELS = 4 * 128 * 128
LAUNCH_BOUND_LATENT_PIXELS = 64 * 64  # one SD1.5 512² image: the largest case where dual was measured best


def choose_strategy(requested: str, *, weights_merged: bool = True, lean_memory: bool = False,
                    latent_pixels_per_branch: int = 0, swap_bytes: int = 0,
                    free_bytes: Optional[int] = None, swap_budget_bytes: Optional[int] = None) -> tuple[str, str]:
    """Returns (strategy name, reason) for a request of auto / batched / dual / sequential / swap.

    swap_bytes: bytes of one copy of the LoRA'd layers; free_bytes: free device memory (None:
    unknown); swap_budget_bytes: the user's cap on extra weight memory."""
    if requested != "auto":
        if requested in ("swap", "dual") and not weights_merged:
            return "batched", (f"'{requested}' needs merged LoRA weights but the host applies the LoRA "
                               f"in the forward pass; using 'batched'")
        return requested, "as requested"
    if lean_memory:
        return "sequential", "memory-lean: no extra weights, no extra batch rows"
    room = free_bytes  # None: unknown, so no extra weights unless the user set a budget
    if swap_budget_bytes is not None:
        room = swap_budget_bytes if room is None else min(room, swap_budget_bytes)
    if weights_merged and swap_bytes and room is not None:
        if latent_pixels_per_branch >= COMPUTE_BOUND_LATENT_PIXELS and room >= swap_bytes:
            return "swap", "compute-bound step and the base weights fit in memory"
        if 0 < latent_pixels_per_branch <= LAUNCH_BOUND_LATENT_PIXELS and room >= 2 * swap_bytes:
            return "dual", "launch-bound step and both weight copies fit in memory"
    return "batched", "launch-bound step: both branches in one forward"
