"""The base branch's text encoding stays finite where the host's emphasis normalisation divides
0 by 0 (the cause of black AutoLoRA images on Forge with an empty negative prompt).

`StandInTextEngine` copies the part of Forge's ClassicTextProcessingEngine.__call__ /
process_tokens that matters here (backend/text_processing/classic_engine.py, emphasis.py; A1111's
sd_hijack_clip.py and sd_emphasis.py are the same): the emphasis mode is read from `opts.emphasis`
on every call, the encoder's output `z` (float16 on Forge's CPU text encoder) goes through the
mode's `after_transformers`, and "Original" rescales by `z.mean() / (z * multipliers).mean()`.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from lib_autolora.text_encoding import encode_finite, is_finite, not_finite_notice


class StandInEmphasisOriginal:
    """emphasis.EmphasisOriginal.after_transformers, verbatim in effect."""

    def __init__(self, z, multipliers):
        self.z, self.multipliers = z, multipliers

    def after_transformers(self):
        original_mean = self.z.mean()
        self.z = self.z * self.multipliers.reshape(self.multipliers.shape + (1,)).expand(self.z.shape)
        new_mean = self.z.mean()
        self.z = self.z * (original_mean / new_mean)


class StandInEmphasisNoNorm(StandInEmphasisOriginal):
    def after_transformers(self):
        self.z = self.z * self.multipliers.reshape(self.multipliers.shape + (1,)).expand(self.z.shape)


class StandInTextEngine:
    def __init__(self, opts, z):
        self.opts, self.z, self.calls = opts, z, 0

    def __call__(self, texts):
        self.calls += 1
        mode = {"Original": StandInEmphasisOriginal, "No norm": StandInEmphasisNoNorm}[self.opts.emphasis]
        emphasis = mode(self.z.clone(), torch.ones(self.z.shape[:2], dtype=self.z.dtype))  # no emphasis: all 1
        emphasis.after_transformers()
        return emphasis.z


def _z(mean_zero: bool):
    """A float16 encoding like a CLIP whose final LayerNorm has no bias: each token's features average
    to ~0, and here exactly 0 (what one CPU's rounding gave for the base branch's empty prompt)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 77, 768, generator=g)
    if mean_zero:
        return (z - z.mean(-1, keepdim=True)).half()  # LayerNorm without bias: the float16 mean is 0
    return (z + 0.05).half()  # a real CLIP's final LayerNorm bias keeps the mean well away from 0


def test_the_hosts_original_emphasis_turns_a_zero_mean_encoding_into_nan():
    opts = SimpleNamespace(emphasis="Original")
    z = _z(mean_zero=True)
    assert float(z.mean()) == 0.0 and float(_z(mean_zero=False).mean()) != 0.0
    assert torch.isnan(StandInTextEngine(opts, z)([""])).all(), "0/0: every value NaN, a black image"
    assert torch.equal(StandInTextEngine(opts, _z(mean_zero=False))([""]), _z(mean_zero=False)), "else the identity"


def test_a_nan_encoding_without_emphasis_is_encoded_again_without_the_division():
    opts = SimpleNamespace(emphasis="Original")
    z = _z(mean_zero=True)
    engine = StandInTextEngine(opts, z)
    out = encode_finite(lambda: engine([""]), opts, [""])
    assert engine.calls == 2 and opts.emphasis == "Original", "the user's option is put back"
    assert torch.equal(out, z), "for texts without emphasis, No norm is Original without the 0/0"
    # a finite first result is used as it is, with one call
    engine = StandInTextEngine(opts, _z(mean_zero=False))
    assert torch.equal(encode_finite(lambda: engine(["a cat"]), opts, ["a cat"]), _z(mean_zero=False))
    assert engine.calls == 1


def test_with_emphasis_in_the_prompt_or_another_mode_no_retry_and_the_caller_falls_back():
    z = _z(mean_zero=True)
    opts = SimpleNamespace(emphasis="Original")
    engine = StandInTextEngine(opts, z)
    assert encode_finite(lambda: engine(["(blurry:1.2)"]), opts, ["(blurry:1.2)"]) is None and engine.calls == 1
    nan = SimpleNamespace(emphasis="No norm")
    assert encode_finite(lambda: torch.full((1, 2), float("nan")), nan, [""]) is None
    assert "negative prompt" in not_finite_notice(True) and "LoRA'd encoding" in not_finite_notice(True)


def test_is_finite_walks_the_hosts_conditioning_structures():
    good, bad = torch.zeros(2), torch.tensor([0.0, float("nan")])
    schedule = SimpleNamespace(end_at_step=4, cond={"crossattn": good, "vector": good})
    multicond = SimpleNamespace(shape=(1,), batch=[[SimpleNamespace(schedules=[schedule], weight=1.0)]])
    assert is_finite([[schedule]]) and is_finite(multicond)
    schedule.cond["vector"] = bad
    assert not is_finite([[schedule]]) and not is_finite(multicond)
    assert is_finite(torch.tensor([1, 2]))  # integer tensors (tokens) are finite by nature
