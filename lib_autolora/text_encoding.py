"""The base branch's text encoding through the host's own prompt function, kept finite.

Both hosts' default emphasis mode ("Original") rescales every encoding by
`mean(z) / mean(z * multipliers)`. Without emphasis in the prompt the multipliers are all 1 and
the factor is exactly 1, unless mean(z) is exactly 0: then it is 0/0 and the whole conditioning is
NaN, which samples to a black image. Forge encodes on the CPU in float16, where a mean of about
1e-7 (any CLIP whose final LayerNorm has no bias, like the random-weight checkpoints of the e2e
suite) lands on 0 for some prompts on some CPUs. The host's own encoding of a prompt can hit it as
well; for the base branch it must not, so:

- an encoding that is not finite, of texts without emphasis syntax, is encoded again in the
  "No norm" mode, which for such texts is the same function without the division;
- if it is still not finite, the caller gets None and uses the host's (LoRA'd) encoding for that
  prompt, with a notice.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Optional

import torch

from .factors import base_branch_coef, lora_branch_coef

EMPHASIS_SYNTAX = ("(", "[")  # the hosts' own test for "this prompt uses emphasis"


def is_finite(obj, _depth: int = 0) -> bool:
    """Every tensor in a host conditioning (lists of schedules, multicond batches, dicts) is finite."""
    if isinstance(obj, torch.Tensor):
        return bool(torch.isfinite(obj).all()) if obj.is_floating_point() else True
    if _depth > 6:
        return True
    if isinstance(obj, dict):
        return all(is_finite(v, _depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(is_finite(v, _depth + 1) for v in obj)
    attributes = getattr(obj, "__dict__", None)
    if attributes:
        return all(is_finite(v, _depth + 1) for v in attributes.values())
    return True


@contextmanager
def option(opts, name: str, value):
    saved = getattr(opts, name)
    setattr(opts, name, value)
    try:
        yield
    finally:
        setattr(opts, name, saved)


def encode_finite(encode: Callable[[], Any], opts, texts: Iterable[str]) -> Optional[Any]:
    """`encode()` (the host's prompt function, hooks in place), or its "No norm" retry when the
    first result is not finite and the texts carry no emphasis; None when neither is finite."""
    result = encode()
    if is_finite(result):
        return result
    texts = [t for t in texts if isinstance(t, str)]
    if getattr(opts, "emphasis", None) == "Original" and not any(s in t for t in texts for s in EMPHASIS_SYNTAX):
        with option(opts, "emphasis", "No norm"):
            result = encode()
        if is_finite(result):
            return result
    return None


def not_finite_notice(negative: bool) -> str:
    which = "negative prompt" if negative else "prompt"
    return (f"AutoLoRA: the text encoder gave NaN for the base branch's {which}; the base branch uses "
            f"the LoRA'd encoding of it")


def branch_encodings(settings, encode: Callable[[float], Any]) -> tuple:
    """(base, LoRA-scale) encodings of one prompt batch: `encode(coef)` with the guided LoRAs at
    `coef` in the text encoder(s), for each branch whose text differs from the host's (None where it
    does not: the base branch with the base text encoder off, the LoRA branch at LoRA scale 1)."""
    base = encode(base_branch_coef(settings.base_strength)) if settings.base_text_encoder else None
    lora = encode(lora_branch_coef(settings.lora_scale)) if settings.lora_scale != 1.0 else None
    return base, lora
