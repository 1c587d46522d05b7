"""The `auto` strategy rule.

Issue 8's per-step ratios on an H100 (fp16, rank-32 LoRA on every attention / feed-forward /
projection Linear; UNet time over plain LoRA + CFG):

| case               | batched hooks | dual weights | two forwards (swap) |
|--------------------|---------------|--------------|---------------------|
| SD1.5 512², 1 img  | 1.40x         | 1.03x        | 2.0x                |
| SD1.5 512², 4 img  | 1.57x         | 1.49x        | 2.0x                |
| SDXL 1024², 1 img  | 1.86x         | 1.28x        | 2.0x                |
| SDXL 1024², 4 img  | 2.21x         | 2.13x        | 2.0x                |

While a step is launch-bound, both branches in one forward cost little more than one, and `dual`
does it without the hooks' extra launches, if two copies of the LoRA'd layers fit in memory (else
`batched`). Once a step is compute-bound (about four SDXL 1024² latents, 4 x 128 x 128 latent
pixels per branch) two forwards over swapped weights win, if one copy fits. A memory-lean request
gets `sequential`: no extra weights, no extra batch rows. Functional LoRAs (not merged into the
weights) can neither swap nor stack: `batched`. The README's GPU table checks this rule per case.
"""
from __future__ import annotations

from typing import Optional

COMPUTE_BOUND_LATENT_PIXELS = 4 * 128 * 128
DUAL_COPIES = 2  # dual stacks [W_lora; W_base]: two copies of the LoRA'd layers


def choose_strategy(requested: str, *, weights_merged: bool = True, lean_memory: bool = False,
                    latent_pixels_per_branch: int = 0, swap_bytes: int = 0,
                    free_bytes: Optional[int] = None, swap_budget_bytes: Optional[int] = None) -> tuple[str, str]:
    """Returns (strategy name, reason) for a request of auto / batched / dual / sequential / swap / toggle.

    swap_bytes: bytes of one copy of the LoRA'd layers; free_bytes: free device memory (None:
    unknown, e.g. a CPU); swap_budget_bytes: the user's cap on extra weight memory."""
    if requested != "auto":
        if requested in ("swap", "toggle", "dual") and not weights_merged:
            return "batched", (f"'{requested}' needs merged LoRA weights but the host applies the LoRA "
                               f"in the forward pass; using 'batched'")
        return requested, "as requested"
    if lean_memory:
        return "sequential", "memory-lean: no extra weights, no extra batch rows"
    if not weights_merged:
        return "batched", "the LoRA is applied in the forward pass: both branches in one forward, hooks"
    room = free_bytes if free_bytes is not None else 0
    if swap_budget_bytes is not None:
        room = min(room, swap_budget_bytes) if free_bytes is not None else swap_budget_bytes
    if latent_pixels_per_branch >= COMPUTE_BOUND_LATENT_PIXELS:
        if swap_bytes and room >= swap_bytes:
            return "swap", "compute-bound step and a copy of the base weights fits in memory"
        return "batched", "compute-bound step, but a copy of the base weights does not fit"
    if swap_bytes and room >= DUAL_COPIES * swap_bytes:
        return "dual", "launch-bound step: both branches in one forward, both weights stacked"
    return "batched", "launch-bound step: both branches in one forward (no room to stack the weights)"
