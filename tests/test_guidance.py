"""The blend itself: the formula, its two identities, the no-CFG variant, the interval; and the
generation's rules around it (the w1/w2 rule, the steps it guides, what a batch may claim), the
schedule, the cap and the hires pass's γ."""

import pytest
import torch

from lib_autolora import step
from lib_autolora.generation import Generation
from lib_autolora.guidance import GuidanceInterval, autolora, autolora_no_cfg, cfg, step_of_sigma
from lib_autolora.params import AutoLoraSettings


def _evals(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 1, 8, 8, generator=g) for _ in range(4)]


def test_formula_matches_algorithm_2():
    bc, bu, lc, lu = _evals()
    out = autolora(bc, bu, lc, lu, gamma=1.5, w1=3.0, w2=7.0)
    base = bu + 3.0 * (bc - bu)
    lora = lu + 7.0 * (lc - lu)
    torch.testing.assert_close(out, base + 1.5 * (lora - base))


def test_identities():
    bc, bu, lc, lu = _evals(1)
    torch.testing.assert_close(autolora(bc, bu, lc, lu, gamma=1.0, w1=2.0, w2=7.0), cfg(lc, lu, 7.0))
    torch.testing.assert_close(autolora(bc, bu, lc, lu, gamma=0.0, w1=7.0, w2=2.0), cfg(bc, bu, 7.0))


def test_no_cfg_variant_is_the_w1_w2_one_case():
    bc, bu, lc, lu = _evals(2)
    torch.testing.assert_close(autolora_no_cfg(bc, lc, gamma=2.5), autolora(bc, bu, lc, lu, gamma=2.5, w1=1, w2=1))


def test_affine_so_it_holds_on_x0_as_on_eps():
    # x0 = x - sigma * eps: the blend of x0 predictions is the x0 of the blended eps.
    bc, bu, lc, lu = _evals(3)
    x, sigma = torch.randn(2, 1, 8, 8), 2.3
    eps_out = autolora(bc, bu, lc, lu, gamma=1.7, w1=4, w2=6)
    x0 = lambda e: x - sigma * e
    x0_out = autolora(x0(bc), x0(bu), x0(lc), x0(lu), gamma=1.7, w1=4, w2=6)
    torch.testing.assert_close(x0_out, x0(eps_out))


def test_w1_w2_follow_the_cfg_scale_unless_set_and_apply_only_with_a_negative_prompt():
    follow = Generation(AutoLoraSettings(enabled=True), "test")
    assert follow.cfg_scales(7.0) == (7.0, 7.0)
    explicit = Generation(AutoLoraSettings(enabled=True, w1=3.0, w2=0.0), "test")
    assert explicit.cfg_scales(7.0) == (3.0, 0.0)
    # no uncond this step (skip-early-CFG, NGMS, guidance-distilled models): each branch is its cond
    assert explicit.cfg_scales(7.0, uncond_evaluated=False) == (7.0, 7.0)
    # CFG 1 on every host: no CFG, so w1 and w2 do not apply (Forge evaluates no negative prompt)
    assert explicit.cfg_scales(1.0) == (1.0, 1.0) and explicit.explicit_cfg_ignored(1.0)
    assert not follow.explicit_cfg_ignored(1.0) and not explicit.explicit_cfg_ignored(7.0)


def test_a_generation_counts_what_it_guides_and_judges_each_batch():
    gen = Generation(AutoLoraSettings(enabled=True, start=0.5, end=1.0, gamma=2.0), "test")
    gen.begin_batch()
    positions = [step.begin(gen, i, 4) for i in range(4)]
    assert [p is not None for p in positions] == [False, False, True, True] and gen.stats.plain_steps == 2
    assert not gen.batch_was_guided() and positions[2] == step.StepPosition(2, 4, 2.0)
    base, lora = torch.zeros(2), torch.ones(2)
    torch.testing.assert_close(step.guide(gen, positions[2], lora, base, lambda x, _scale: x, 7.0),
                               torch.full((2,), 2.0))
    assert gen.batch_was_guided() and gen.stats.guided_steps == 1
    gen.begin_batch()
    assert not gen.batch_was_guided(), "a new batch starts unguided"
    gen.stopped = "checkpoint changed"
    assert step.begin(gen, 3, 4) is None
    gen.note("AutoLoRA: once")
    gen.note("AutoLoRA: once")
    assert gen.stats.notices == ["AutoLoRA: once"]


def test_interval_by_step_fraction():
    iv = GuidanceInterval(0.2, 0.6)
    assert [iv.contains_step(i, 10) for i in range(10)] == [False, False, True, True, True, True,
                                                            False, False, False, False]
    assert all(GuidanceInterval().contains_step(i, 7) for i in range(7))


def test_interval_by_sigma_follows_steps_and_midpoints():
    sigmas = [10.0, 5.0, 2.0, 1.0, 0.5, 0.0]
    assert step_of_sigma(10.0, sigmas) == 0
    assert step_of_sigma(7.0, sigmas) == 0  # a second-order sampler's midpoint of step 0
    assert step_of_sigma(2.0, sigmas) == 2
    assert step_of_sigma(0.3, sigmas) == 4
    iv = GuidanceInterval(0.0, 0.4)  # steps 0 and 1 of 5
    assert [iv.contains_sigma(s, sigmas) for s in (10.0, 7.0, 5.0, 3.0, 2.0, 1.0, 0.5)] == \
        [True, True, True, True, False, False, False]


def test_schedules_follow_their_formulas_and_keep_gamma_1_and_the_constant_default():
    from lib_autolora.guidance import schedule_weight, scheduled_gamma
    u = [0.0, 0.25, 0.5, 1.0]
    assert [schedule_weight("constant", x) for x in u] == [1.0] * 4
    assert [schedule_weight("early", x) for x in u] == [1.0, 0.75, 0.5, 0.0]
    assert [schedule_weight("late", x, power=2) for x in u] == [0.0, 0.0625, 0.25, 1.0]
    assert [schedule_weight("middle", x) for x in u] == [0.0, 0.75, 1.0, 0.0]
    assert schedule_weight("late", 0.0, floor=0.25) == 0.25 and schedule_weight("late", 1.0, floor=0.25) == 1.0
    assert scheduled_gamma(1.0, 0.3) == 1.0, "γ 1 is the plain LoRA under any schedule"
    assert scheduled_gamma(2.0, 0.5) == 1.5 and scheduled_gamma(0.0, 1.0) == 0.0


def test_progress_runs_over_the_guided_steps_only():
    iv = GuidanceInterval(0.25, 0.75)  # 8 steps: 2..5 guided
    assert [iv.progress(i, 8) for i in (2, 3, 4, 5)] == [0.0, 1 / 3, 2 / 3, 1.0]
    assert GuidanceInterval().progress(0, 4) == 0.0 and GuidanceInterval().progress(3, 4) == 1.0
    assert GuidanceInterval().progress(0, 1) == 0.0


def test_the_cap_bounds_the_push_per_image_relative_to_the_cfg_update():
    from lib_autolora.guidance import capped_push
    push = torch.stack([torch.full((1, 2, 2), 3.0), torch.full((1, 2, 2), 0.1)])
    reference = torch.ones(2, 1, 2, 2)  # |reference| = 2 per image
    out = capped_push(push, reference, 0.5)  # limit |push| <= 1 per image
    assert torch.linalg.vector_norm(out[0]).item() == pytest.approx(1.0)
    torch.testing.assert_close(out[1], push[1]), "a push under the cap is unchanged"
    assert torch.equal(capped_push(push, reference, 0.0), torch.zeros_like(push)), "cap 0: no push, the base"


def test_a_generation_applies_schedule_hires_gamma_and_cap():
    gen = Generation(AutoLoraSettings(enabled=True, gamma=3.0, schedule="late", hr_gamma=2.0), "test")
    assert gen.gamma_at(0, 4) == 1.0 and gen.gamma_at(3, 4) == 3.0
    gen.hires = True
    assert gen.gamma_at(3, 4) == 2.0 and gen.gamma_at(0, 4) == 1.0
    base, lora, uncond = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 1.0), torch.full((1, 1, 2, 2), 0.5)
    def guided(gen):
        return step.guide(gen, step.begin(gen, 0, 1), lora, base, lambda x, _scale: x, 7.0, lora_uncond=uncond)

    capped = Generation(AutoLoraSettings(enabled=True, gamma=4.0, cap=1.0), "test")
    out = guided(capped)  # push 4, capped to |lora - uncond| = 1 per element here
    torch.testing.assert_close(out, torch.full((1, 1, 2, 2), 0.5))
    assert torch.equal(guided(Generation(AutoLoraSettings(enabled=True, cap=0.0), "t")), base)
