"""Full k-diffusion sampling loops through AutoLoraGuider: the identities, interval gating,
the no-CFG variant, several LoRAs, and an interrupt between steps.

Tolerance: final images within 1e-3 (fp32) of the reference loop; the reference and the guided
loop differ only by float rounding of the blend (γ=1 or γ=0 weights the other branch by 0),
amplified a little over the steps. The LoRA changes the images by far more (asserted).
"""
import pytest
import torch

from helpers import fingerprint, lora_state_dict, make_model, merged_copy
from lib_autolora.base_branch import make_strategy, split_batch
from demo.ksampling import karras_sigmas, sample
from lib_autolora.guidance import GuidanceInterval, cfg
from demo.guider import AutoLoraGuider, BranchConds
from lib_autolora.params import AutoLoraSettings
from demo.kohya import factors_from_kohya

CFG = 5.0
CLASSES = [1, 7]


class CountingModel:
    """Counts forward calls and rows, the proof of how much work each step did."""

    def __init__(self, denoiser):
        self.denoiser, self.calls, self.rows = denoiser, 0, 0

    def __call__(self, x, sigma, context):
        self.calls += 1
        self.rows += x.shape[0]
        return self.denoiser(x, sigma, context)


def plain_cfg_sample(model, sampler, sigmas, x, classes=CLASSES, scale=CFG, use_uncond=True):
    cond = model.text_encoder(torch.tensor(classes))
    uncond = model.text_encoder(torch.full((len(classes),), model.null_class))
    n = x.shape[0]

    def denoise(x, sigma, **_):
        if not use_uncond:
            return model.denoiser(x, sigma, cond)
        out = model.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, uncond]))
        c, u = split_batch(out, n)
        return cfg(c, u, scale)

    return sample(sampler, denoise, x, sigmas)


def autolora_sample(merged, factors, strategy, sampler, sigmas, x, *, gamma, w1, w2, interval=GuidanceInterval(),
                    use_uncond=True, callback=None, counter=None):
    labels = torch.tensor(CLASSES)
    null = torch.full((len(CLASSES),), merged.null_class)
    with make_strategy(strategy, factors) as branch:
        lora = BranchConds(merged.text_encoder(labels), merged.text_encoder(null) if use_uncond else None)
        base = BranchConds(branch.evaluate_base(merged.text_encoder, (labels,)),
                           branch.evaluate_base(merged.text_encoder, (null,)) if use_uncond else None)
        model = counter or CountingModel(merged.denoiser)
        settings = AutoLoraSettings(enabled=True, gamma=gamma, w1=w1, w2=w2, start=interval.start, end=interval.end)
        guider = AutoLoraGuider(model, branch, settings, lora=lora, base=base, cfg_scale=CFG, sigmas=sigmas)
        out = sample(sampler, guider, x, sigmas, **({"callback": callback} if callback else {}))
    return out, guider


@pytest.fixture(scope="module")
def setup():
    clean = make_model(0)
    sd = lora_state_dict(clean, seed=1)
    merged = merged_copy(0, [(sd, 1.0)])
    factors = factors_from_kohya(sd, merged.kohya_modules())
    sigmas = karras_sigmas(8, 0.02, 20.0)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    return clean, merged, factors, sigmas, x, sd


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_identity_gamma_one_is_plain_lora(setup, sampler):
    clean, merged, factors, sigmas, x, _ = setup
    want = plain_cfg_sample(merged, sampler, sigmas, x)
    assert (want - plain_cfg_sample(clean, sampler, sigmas, x)).abs().max() > 0.05
    got, guider = autolora_sample(merged, factors, "batched", sampler, sigmas, x, gamma=1.0, w1=2.0, w2=CFG)
    assert guider.guided_steps == 8  # the base branch really ran every step
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)


@pytest.mark.parametrize("strategy", ["batched", "dual", "sequential", "swap"])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_identity_gamma_zero_is_never_lora_model(setup, sampler, strategy):
    clean, merged, factors, sigmas, x, _ = setup
    before = fingerprint(merged)
    want = plain_cfg_sample(clean, sampler, sigmas, x)
    got, _ = autolora_sample(merged, factors, strategy, sampler, sigmas, x, gamma=0.0, w1=CFG, w2=9.0)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    assert fingerprint(merged) == before


def test_autolora_differs_from_both(setup):
    clean, merged, factors, sigmas, x, _ = setup
    got, _ = autolora_sample(merged, factors, "batched", "euler", sigmas, x, gamma=1.5, w1=CFG, w2=CFG)
    assert (got - plain_cfg_sample(merged, "euler", sigmas, x)).abs().max() > 0.01
    assert (got - plain_cfg_sample(clean, "euler", sigmas, x)).abs().max() > 0.01
    again, _ = autolora_sample(merged, factors, "batched", "euler", sigmas, x, gamma=1.5, w1=CFG, w2=CFG)
    assert torch.equal(got, again)


def test_fp16_identity(setup):
    clean, _, _, sigmas, x, sd = setup
    merged16 = merged_copy(0, [(sd, 1.0)], torch.float16)
    factors16 = factors_from_kohya(sd, merged16.kohya_modules())
    want = plain_cfg_sample(make_model(0).to(torch.float16), "euler", sigmas, x.half())
    got, _ = autolora_sample(merged16, factors16, "batched", "euler", sigmas, x.half(), gamma=0.0, w1=CFG, w2=CFG)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=0)


@pytest.mark.parametrize("strategy,extra_calls", [("batched", 0), ("sequential", 1)])
def test_interval_gating_costs_nothing_outside(setup, strategy, extra_calls):
    _, merged, factors, sigmas, x, _ = setup
    n = x.shape[0]
    counter = CountingModel(merged.denoiser)
    _, guider = autolora_sample(merged, factors, strategy, "euler", sigmas, x, gamma=1.5, w1=CFG, w2=CFG,
                                interval=GuidanceInterval(0.25, 0.75), counter=counter)
    assert (guider.guided_steps, guider.plain_steps) == (4, 4)  # steps 2..5 of 8
    # plain steps: one forward of cond+uncond (2n rows); guided: 4n rows, in one or two forwards.
    assert counter.rows == 4 * (2 * n) + 4 * (4 * n)
    assert counter.calls == 4 + 4 * (1 + extra_calls)


def test_no_cfg_variant(setup):
    clean, merged, factors, sigmas, x, _ = setup
    counter = CountingModel(merged.denoiser)
    got, _ = autolora_sample(merged, factors, "batched", "euler", sigmas, x, gamma=0.0, w1=1, w2=1,
                             use_uncond=False, counter=counter)
    torch.testing.assert_close(got, plain_cfg_sample(clean, "euler", sigmas, x, use_uncond=False), atol=1e-3, rtol=0)
    assert counter.rows == 8 * 2 * x.shape[0]  # two evaluations per step: base cond + LoRA cond
    got1, _ = autolora_sample(merged, factors, "batched", "euler", sigmas, x, gamma=1.0, w1=1, w2=1, use_uncond=False)
    torch.testing.assert_close(got1, plain_cfg_sample(merged, "euler", sigmas, x, use_uncond=False), atol=1e-3, rtol=0)


def test_several_loras_all_guided(setup):
    clean, _, _, sigmas, x, sd = setup
    sd2 = lora_state_dict(clean, seed=9, tucker_mid=True)
    merged = merged_copy(0, [(sd, 0.6), (sd2, 0.9)])
    factors = factors_from_kohya(sd, merged.kohya_modules(), strength=0.6)
    factors = factors_from_kohya(sd2, merged.kohya_modules(), strength=0.9, into=factors)
    got, _ = autolora_sample(merged, factors, "batched", "dpmpp_2m", sigmas, x, gamma=0.0, w1=CFG, w2=CFG)
    torch.testing.assert_close(got, plain_cfg_sample(clean, "dpmpp_2m", sigmas, x), atol=1e-3, rtol=0)


@pytest.mark.parametrize("strategy", ["batched", "dual", "swap"])
def test_interrupt_between_steps_restores_model(setup, strategy):
    _, merged, factors, sigmas, x, _ = setup
    before = fingerprint(merged)

    def interrupt(info):
        if info["i"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        autolora_sample(merged, factors, strategy, "euler", sigmas, x, gamma=1.5, w1=CFG, w2=CFG, callback=interrupt)
    assert fingerprint(merged) == before
    assert all(not m._forward_hooks for m in merged.modules())
