"""The `auto` strategy rule, checked against the GPU tables in the README (issue 8).

Whole-image time over plain LoRA generation in Forge (fp16, 20 Euler steps, rank-32 LoRA on every
attention / feed-forward / projection layer), on two GPUs, 2026-11-26:

| case                 | GPU  | batched | dual  | swap  | sequential | toggle | floor (no hooks) |
|----------------------|------|---------|-------|-------|------------|--------|------------------|
| SD1.5 512², 1 image  | H200 | 2.03x   | 1.82x | 1.85x | 2.43x      | 4.54x  |                  |
| SD1.5 512², 1 image  | H100 | 1.60x   | 1.40x | 1.74x | 2.03x      | 3.57x  | 1.03x per step   |
| SDXL 1024², 1 image  | H200 | 2.41x   | 2.74x | 2.63x | 3.03x      | 10.55x |                  |
| SDXL 1024², 1 image  | H100 | 2.06x   | 2.01x | 2.17x | 2.71x      | -      | 1.37x per step   |
| SDXL 1024², 4 images | H200 | -       | 2.11x | 1.94x | 2.06x      | -      |                  |
| SDXL 1024², 4 images | H100 | 2.03x   | -     | 1.89x | 1.94x      | -      | 1.96x per step   |

Later H100 runs of the current code (README, runs 5 and 6): SD1.5 1 image `batched` 1.48x / 1.66x,
`dual` 1.56x / 1.27x (per step 58 vs 69 ms, 38 vs 46 ms); SDXL 1 image `batched` 2.31x / 2.19x,
`dual` 1.89x / 1.94x for +63 % peak memory; SDXL 4 images `swap` 1.76x / 1.79x.

One image of SD1.5 (64 x 64 latent pixels) is launch-bound: `dual`, which runs each LoRA'd Linear
of both branches without hooks, was fastest per step in every run on both GPUs, for a base copy of
the LoRA'd Linears (+22 % peak memory, under 1 GiB), so auto takes it when room for two copies is
free (a margin: it needs one, plus one of the Linears without a bias). One SDXL image: `dual` was
level with `batched` in run 3 and behind on the H200, ahead by 0.25-0.4x in runs 5 and 6 (within
the 0.3x the same strategy moves between runs), for +63 % memory against +2 %: `batched`.
Once a step is compute-bound (four SDXL 1024² latents, 4 x 128 x 128 latent pixels per branch) two
forwards over swapped weights win on both GPUs, if a copy of the LoRA'd layers fits in free memory.
A memory-lean request gets `sequential` (+1 to +2 % peak). Functional LoRAs (not merged into the
weights) can neither swap nor stack: `batched`. Free memory unknown: no extra weights.
"""
from __future__ import annotations

from typing import Optional

COMPUTE_BOUND_LATENT_PIXELS = 4 * 128 * 128
LAUNCH_BOUND_LATENT_PIXELS = 64 * 64  # one SD1.5 512² image: the largest case where dual was measured best


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
    room = free_bytes  # None: unknown, so no extra weights unless the user set a budget
    if swap_budget_bytes is not None:
        room = swap_budget_bytes if room is None else min(room, swap_budget_bytes)
    if weights_merged and swap_bytes and room is not None:
        if latent_pixels_per_branch >= COMPUTE_BOUND_LATENT_PIXELS and room >= swap_bytes:
            return "swap", "compute-bound step and the base weights fit in memory"
        if 0 < latent_pixels_per_branch <= LAUNCH_BOUND_LATENT_PIXELS and room >= 2 * swap_bytes:
            return "dual", "launch-bound step and both weight copies fit in memory"
    return "batched", "launch-bound step: both branches in one forward"
