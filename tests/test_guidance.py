"""The blend itself: the formula, its two identities, the no-CFG variant, validation, interval."""
import math

import pytest
import torch

from lib_autolora.guidance import (GuidanceInterval, GuidanceValueError, autolora, autolora_no_cfg, cfg,
                                   check_scales, resolve_cfg_scale, step_of_sigma)


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


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "abc", None])
def test_rejects_non_finite(bad):
    with pytest.raises(GuidanceValueError):
        check_scales(bad, 1, 1)
    with pytest.raises(GuidanceValueError):
        check_scales(1, bad, 1)


def test_negative_cfg_rejected_negative_gamma_allowed():
    assert check_scales(-2.0, 0.0, 3.0) == (-2.0, 0.0, 3.0)
    with pytest.raises(GuidanceValueError, match="w2"):
        check_scales(1.0, 1.0, -0.5)


def test_unset_cfg_follows_generation():
    assert resolve_cfg_scale(None, 7.0) == 7.0
    assert resolve_cfg_scale(3.0, 7.0) == 3.0


def test_interval_by_step_fraction():
    iv = GuidanceInterval(0.2, 0.6)
    assert [iv.contains_step(i, 10) for i in range(10)] == [False, False, True, True, True, True,
                                                            False, False, False, False]
    assert all(GuidanceInterval().contains_step(i, 7) for i in range(7))
    with pytest.raises(GuidanceValueError):
        GuidanceInterval(0.7, 0.3)
    with pytest.raises(GuidanceValueError):
        GuidanceInterval(0.0, float("nan"))


def test_interval_by_sigma_follows_steps_and_midpoints():
    sigmas = [10.0, 5.0, 2.0, 1.0, 0.5, 0.0]
    assert step_of_sigma(10.0, sigmas) == 0
    assert step_of_sigma(7.0, sigmas) == 0  # a second-order sampler's midpoint of step 0
    assert step_of_sigma(2.0, sigmas) == 2
    assert step_of_sigma(0.3, sigmas) == 4
    iv = GuidanceInterval(0.0, 0.4)  # steps 0 and 1 of 5
    assert [iv.contains_sigma(s, sigmas) for s in (10.0, 7.0, 5.0, 3.0, 2.0, 1.0, 0.5)] == \
        [True, True, True, True, False, False, False]
