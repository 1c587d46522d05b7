"""The offline demo: shipped weights, the training pieces, and the quality claim on real samples."""
import time
from dataclasses import replace

import pytest
import torch

from demo import data
from demo.__main__ import (BASE_PATH, EVALUATORS_PATHS, LORA_PATH, LORA_PATHS, Settings,
                                        load_lora_model, main, prompts, sample_autolora, sample_lora_cfg)
from demo.metrics import Evaluators, Scores, diversity
from research import front, pareto, sweep
from demo.train import ASSETS, LORA, SHIPPED_STYLES, TrainingLora, load_base, train_base, train_lora
from demo.kohya import factors_from_kohya, load_state_dict, merge_into

from helpers import fingerprint

SETTINGS = Settings()

# The quality check: AutoLoRA + CFG at the paper's default gamma against LoRA + CFG, same LoRA
# scale, same seeds. Style presence (0-5) may drop by at most STYLE_MARGIN. The effect it must show
# and the cost it may have were declared from the spread of the same comparison over six other
# seed sets of this size (python -m research.claim_margins --seeds-per-class 96 --sets 6, printout
# in research/runs/claim-margins-96-seeds.txt): relative diversity gain +0.148, sd 0.034; accuracy
# change -0.048, sd 0.003. The margins are the mean -/+ 2 sd. With 24 seeds per digit the gain's sd
# was 0.080 (claim-margins-24-seeds.txt), too wide to tell a gain from a draw of seeds.
QUALITY_SCALE = 1.0
QUALITY_GAMMA = 1.5
QUALITY_SEEDS_PER_CLASS = 96  # x 10 digits = 960 samples per method
STYLE_MARGIN = sweep.STYLE_MARGIN
MIN_DIVERSITY_GAIN = 0.08  # AutoLoRA's diversity / LoRA + CFG's - 1
MAX_ACCURACY_LOSS = 0.055  # share of samples that no longer draw the digit asked for


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def evaluators():
    return Evaluators.load()


@pytest.fixture(scope="module")
def style_evaluators():
    return {style: Evaluators.load(EVALUATORS_PATHS[style]) for style in SHIPPED_STYLES}


@pytest.mark.parametrize("style", SHIPPED_STYLES)
def test_shipped_assets_are_small_and_kohya_format(style):
    files = sorted(ASSETS.glob("*.safetensors"))
    assert {f.name for f in files} >= {BASE_PATH.name, LORA_PATHS[style].name, EVALUATORS_PATHS[style].name}
    assert sum(f.stat().st_size for f in files) < 5 * 1024 * 1024
    sd = load_state_dict(LORA_PATHS[style])
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in sd)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in sd)
    assert max(v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")) <= 8
    model = load_base(BASE_PATH)
    factors = factors_from_kohya(str(LORA_PATHS[style]), model.kohya_modules())  # strict: every key maps
    assert len(factors) == len(model.kohya_modules())
    assert not factors.skipped


def test_demo_samples_deterministically_and_does_not_change_the_weights():
    model, factors = load_lora_model(1.0)
    before = fingerprint(model)
    labels, seeds = prompts(1)
    a = sample_autolora(model, factors, labels, seeds, 1.5, SETTINGS)
    b = sample_autolora(model, factors, labels, seeds, 1.5, SETTINGS)
    assert torch.equal(a, b)
    assert fingerprint(model) == before
    # A sample depends on its seed, not on its batch.
    one = sample_autolora(model, factors, labels[3:4], seeds[3:4], 1.5, SETTINGS)
    torch.testing.assert_close(one, a[3:4], atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2s_a"])
def test_ancestral_samplers_draw_per_seed_noise(sampler):
    """Ancestral samplers draw fresh noise every step: it comes from each seed's own generator, so
    gamma 1 still reproduces LoRA + CFG (same noise in both methods) and a sample does not depend
    on its batch."""
    settings = Settings(sampler=sampler, steps=8)
    model, factors = load_lora_model(1.0)
    labels, seeds = prompts(1)
    plain = sample_lora_cfg(model, labels, seeds, settings)
    auto = sample_autolora(model, factors, labels, seeds, 1.0, settings, w1=7.0)
    torch.testing.assert_close(auto, plain, atol=2e-4, rtol=0)
    alone = sample_lora_cfg(model, labels[5:6], seeds[5:6], settings)
    torch.testing.assert_close(alone, plain[5:6], atol=1e-4, rtol=0)
    other_seeds = sample_lora_cfg(model, labels, [s + 1 for s in seeds], settings)
    assert (other_seeds - plain).abs().max() > 0.1


def test_sweep_baseline_is_what_gamma_1_gives(evaluators):
    """The sweep's baseline (LoRA + CFG at w2) is AutoLoRA at gamma 1 whatever w1 is, so at gamma 1
    both columns score the same and the claim (strictly more diverse) does not hold."""
    cells = list(sweep.run(evaluators, gamma=1.0, scales=[1.0], samplers=["euler_a"], pairs=[(7.0, 2.0)],
                           samples_per_class=2, settings=Settings(steps=8)))
    assert len(cells) == 1
    cell = cells[0]
    assert (cell.w1, cell.w2) == (7.0, 2.0)
    assert cell.auto.diversity == pytest.approx(cell.lora.diversity, abs=1e-3)
    assert cell.auto.style == pytest.approx(cell.lora.style, abs=1e-3)
    assert not cell.holds
    assert "euler_a" in sweep.format_cell(cell) and sweep.format_cell(cell).endswith("no")


def test_sweep_and_pareto_sample_the_lora_they_are_given(style_evaluators):
    """--style bold: both checks sample the bold LoRA, not the default one."""
    evaluators, settings = style_evaluators["bold"], Settings(steps=4)
    labels, seeds = prompts(2, first_seed=sweep.FIRST_SEED)
    model, _ = load_lora_model(1.0, lora_path=LORA_PATHS["bold"])
    expected = evaluators.score(sample_lora_cfg(model, labels, seeds, replace(settings, cfg=4.0)), labels)
    (cell,) = sweep.run(evaluators, scales=[1.0], samplers=["dpmpp_2m"], pairs=[(4.0, 4.0)], samples_per_class=2,
                        settings=settings, lora_path=LORA_PATHS["bold"])
    assert cell.lora == expected
    curves = pareto.baseline_curves(evaluators, labels, seeds, [4.0], [1.0], settings, LORA_PATHS["bold"])
    assert curves[4.0] == [(1.0, expected)]
    default = pareto.baseline_curves(evaluators, labels, seeds, [4.0], [1.0], settings)
    assert default[4.0][0][1] != expected


def test_front_matches_the_style_on_the_lora_cfg_curve():
    curve = [(0.2, 1.0), (0.4, 3.0), (0.6, 4.0), (0.8, 5.0)]
    assert front.matched_scale(curve, 2.0) == pytest.approx(0.3)  # interpolated between 0.2 and 0.4
    assert front.matched_scale(curve, 3.0) == 0.4  # a grid point
    assert front.matched_scale(curve, 0.5) == 0.2  # below the curve's start: its lowest scale
    assert front.matched_scale(curve, 5.0 + front.STYLE_TIE / 2) == 0.8  # a float rounding apart
    # the curve's point a rounding above the style (4e-6, seen on another CPU): that point, not a
    # value interpolated a hair below it
    assert front.matched_scale(curve, 3.0 - 4e-6) == 0.4
    assert front.matched_scale(curve, 5.1) is None  # LoRA + CFG never gets there
    # Non-monotone: the first crossing, i.e. the lowest LoRA scale that gives the style.
    assert front.matched_scale([(0.2, 1.0), (0.4, 4.0), (0.6, 3.0), (0.8, 5.0)], 3.5) == pytest.approx(0.3667, abs=1e-4)


def test_front_wins_only_when_more_diverse_and_as_accurate():
    matched = Scores(diversity=0.02, style=4.0, accuracy=0.9)
    assert front.wins(Scores(0.03, 4.0, 0.86), matched)
    assert not front.wins(Scores(0.03, 4.0, 0.84), matched)  # diversity bought with wrong digits
    assert not front.wins(Scores(0.02, 4.0, 0.95), matched)  # a tie is no win


def test_front_at_gamma_1_matches_lora_cfg_at_the_same_scale(evaluators):
    """gamma 1 is LoRA + CFG: through the real sampling path the match lands on the same LoRA
    scale, the matched samples score the same, and AutoLoRA does not "win"."""
    rows = list(front.run(evaluators, cfgs=[4.0], gammas=[1.0], scales=[0.6], curve_scales=[0.4, 0.6, 0.8],
                          samples_per_class=2, settings=Settings(steps=8)))
    assert len(rows) == 1
    row = rows[0]
    assert row.matched_scale == pytest.approx(0.6)
    assert row.matched.diversity == pytest.approx(row.auto.diversity, abs=1e-4)
    assert row.matched.style == pytest.approx(row.auto.style, abs=1e-4)
    assert not row.wins
    assert front.format_row(row).endswith("no")


def test_pareto_interpolates_each_score_along_the_curve():
    curve = [(0.2, Scores(0.10, 1.0, 0.5)), (0.4, Scores(0.05, 3.0, 0.9)), (0.6, Scores(0.03, 5.0, 1.0))]
    assert pareto.interpolate(curve, 0.4) == curve[1][1]
    mid = pareto.interpolate(curve, 0.3)
    assert (mid.diversity, mid.style, mid.accuracy) == pytest.approx((0.075, 2.0, 0.7))
    assert pareto.interpolate(curve, 0.1) == curve[0][1] and pareto.interpolate(curve, 0.9) == curve[-1][1]


def test_pareto_answer_is_the_most_diverse_cfg_that_reaches_the_style_accurately():
    # cfg 2: reaches style 4 at 0.5, diversity 0.04 there but accuracy 0.70 (misdrawn digits)
    # cfg 4: reaches style 4 at 0.5, diversity 0.03, accuracy 0.95
    # cfg 7: tops out at style 3.5, never reaches it
    curves = {
        2.0: [(0.4, Scores(0.05, 3.0, 0.6)), (0.6, Scores(0.03, 5.0, 0.8))],
        4.0: [(0.4, Scores(0.04, 3.0, 0.9)), (0.6, Scores(0.02, 5.0, 1.0))],
        7.0: [(0.4, Scores(0.09, 3.0, 1.0)), (0.6, Scores(0.08, 3.5, 1.0))],
    }
    answer = pareto.best_answer(curves, Scores(0.035, 4.0 + pareto.STYLE_TOLERANCE, 0.95))
    assert answer.cfg == 4.0 and answer.scale == pytest.approx(0.5)
    assert answer.interpolated.diversity == pytest.approx(0.03)
    # the same point drawn with worse digits: cfg 2's accuracy is now within the margin, and it is more diverse
    assert pareto.best_answer(curves, Scores(0.035, 4.0 + pareto.STYLE_TOLERANCE, 0.72)).cfg == 2.0
    # a style none of them reaches: no answer, the point is beyond the front by definition
    assert pareto.best_answer(curves, Scores(0.01, 5.5, 1.0)) is None


def test_pareto_point_is_beyond_only_when_it_beats_every_measured_answer():
    auto = Scores(0.029, 4.0, 0.95)
    assert pareto.beats(auto, Scores(0.028, 4.0, 0.95))
    assert not pareto.beats(Scores(0.029, 4.0, 0.89), Scores(0.028, 4.0, 0.95))  # bought with wrong digits
    assert not pareto.beats(Scores(0.028, 4.0, 1.0), Scores(0.028, 4.0, 0.95))  # a tie is not a win
    matched = pareto.Candidate(4.0, 0.5, Scores(0.028, 4.0, 0.95), "matched")
    curve_point = pareto.Candidate(2.0, 0.7, Scores(0.031, 4.5, 0.93), "curve")
    point = pareto.Point(1.5, 0.6, 4.0, 4.0, auto, (matched,))
    assert point.beyond and point.shown is matched
    point = pareto.Point(1.5, 0.6, 4.0, 4.0, auto, (matched, curve_point))
    assert not point.beyond and point.shown is curve_point
    assert pareto.format_point(point).endswith("curve   | no")
    assert pareto.Point(1.5, 0.6, 4.0, 4.0, auto, ()).beyond  # nothing reaches it
    assert not pareto.Point(1.5, 0.6, 4.0, 4.0, Scores(0.5, 4.0, 0.5), ()).beyond  # misdrawn: not judged


def test_pareto_curve_points_answer_past_the_first_crossing():
    """A curve whose accuracy dips where the style comes in (half-styled digits are misread):
    the first crossing of style 4.8 is too inaccurate, a higher scale on the same curve is not."""
    curves = {1.5: [(0.5, Scores(0.15, 4.5, 0.40)), (0.6, Scores(0.09, 4.86, 0.72)), (0.7, Scores(0.047, 4.96, 0.92))]}
    point = Scores(0.035, 4.85, 0.97)
    assert pareto.best_answer(curves, point) is None
    (only,) = pareto.curve_candidates(curves, point)
    assert (only.cfg, only.scale, only.kind) == (1.5, 0.7, "curve")
    assert not pareto.beats(point, only.scores)
    assert pareto.curve_candidates(curves, Scores(0.035, 4.97 + pareto.STYLE_TOLERANCE * 2, 0.97)) == []


def test_pareto_gamma_1_is_not_beyond_its_own_curve(evaluators):
    """gamma 1 with w2 = a curve's CFG is LoRA + CFG at that CFG (whatever w1): through the real
    sampling path the answer is that CFG at the same LoRA scale, it measures the same, and the
    point is not beyond the front."""
    settings = Settings(steps=8)
    labels, seeds = prompts(2, first_seed=pareto.FIRST_SEED)
    curves = pareto.baseline_curves(evaluators, labels, seeds, cfgs=[4.0], scales=[1.0], settings=settings)
    points = list(pareto.run(evaluators, samples_per_class=2, gammas=[1.0], scales=[1.0], w1s=[7.0], w2s=[4.0],
                             settings=settings, curves=curves))
    assert len(points) == 1
    point = points[0]
    assert point.judged, point.auto
    matched = [c for c in point.candidates if c.kind == "matched"]
    assert [(c.cfg, c.scale) for c in matched] == [(4.0, 1.0)]
    assert matched[0].scores.diversity == pytest.approx(point.auto.diversity, abs=1e-4)
    assert matched[0].scores.style == pytest.approx(point.auto.style, abs=1e-4)
    # the curve's own point at scale 1.0 is the same setting, measured once more
    assert [(c.cfg, c.scale) for c in point.candidates if c.kind == "curve"] == [(4.0, 1.0)]
    assert not point.beyond
    assert pareto.format_point(point).endswith("no")


def test_strategies_agree_on_the_demo():
    model, factors = load_lora_model(0.8)
    labels, seeds = prompts(1)
    ref = sample_autolora(model, factors, labels, seeds, 1.5, SETTINGS)
    for name in ("sequential", "swap"):
        out = sample_autolora(model, factors, labels, seeds, 1.5, Settings(strategy=name))
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=0)


@pytest.mark.parametrize("style", SHIPPED_STYLES)
def test_the_shipped_models_do_what_the_demo_says(style, style_evaluators):
    """Base + CFG draws the digits asked for, plain; LoRA + CFG draws them in the LoRA's style."""
    evaluators = style_evaluators[style]
    model, factors = load_lora_model(1.0, lora_path=LORA_PATHS[style])
    labels, seeds = prompts(4)
    base = evaluators.score(sample_autolora(model, factors, labels, seeds, 0.0, SETTINGS), labels)
    lora = evaluators.score(sample_lora_cfg(model, labels, seeds, SETTINGS), labels)
    assert base.accuracy >= 0.8 and base.style < 1.0
    assert lora.accuracy >= 0.8 and lora.style > 4.0


def _lora_vs_autolora(evaluators, scale, gamma, seeds_per_class, lora_path=LORA_PATH):
    model, factors = load_lora_model(scale, lora_path=lora_path)
    labels, seeds = prompts(seeds_per_class, first_seed=5000)  # not the demo's seeds
    lora = evaluators.score(sample_lora_cfg(model, labels, seeds, SETTINGS), labels)
    auto = evaluators.score(sample_autolora(model, factors, labels, seeds, gamma, SETTINGS), labels)
    return lora, auto


FAR_STYLE_XFAIL = pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "Measured on the shipped 'italic negative' LoRA (CFG 4, dpmpp_2m 20 steps, 240 samples): at LoRA "
    "scale 1.0, AutoLoRA gamma 1.5 is LESS diverse than LoRA+CFG (0.009 vs 0.024; style 5.00 vs 4.98). "
    "The inverted palette is far from anything the base model knows (its denoising loss 11x that of "
    "plain digits), so the base cannot tell the LoRA's memorised digits from the rest and gamma > 1 "
    "only sharpens the LoRA; on the 'bold' LoRA, near the base, the claim holds. See docs/demo.md. "
    "Strict: if the claim starts to hold here (new weights, a core change), this XPASS fails."))
QUALITY_STYLES = [pytest.param(data.STYLE_NAME, marks=FAR_STYLE_XFAIL), "bold"]


@pytest.fixture(scope="module", params=QUALITY_STYLES)
def quality_run(request, style_evaluators):
    style = request.param
    start = time.time()
    lora, auto = _lora_vs_autolora(style_evaluators[style], QUALITY_SCALE, QUALITY_GAMMA,
                                   QUALITY_SEEDS_PER_CLASS, LORA_PATHS[style])
    return lora, auto, time.time() - start


def test_quality_autolora_is_more_diverse_at_equal_lora_scale(quality_run):
    """The paper's claim (Tables 1-2) on the tiny model: higher Diversity by the declared minimum
    effect, style kept, and class accuracy lost by no more than the declared cost."""
    lora, auto, _ = quality_run
    summary = f"LoRA+CFG {lora}, AutoLoRA+CFG {auto}"
    assert auto.style >= lora.style - STYLE_MARGIN, summary
    assert auto.diversity / lora.diversity - 1.0 >= MIN_DIVERSITY_GAIN, summary
    assert lora.accuracy - auto.accuracy <= MAX_ACCURACY_LOSS, summary
    assert sweep.claim_holds(lora, auto)


@pytest.mark.parametrize("style", SHIPPED_STYLES)
def test_quality_autolora_strengthens_a_weak_lora(style, style_evaluators):
    """The CPS column of Table 1: at a low LoRA scale, AutoLoRA + CFG (gamma 1.5) shows the
    LoRA's style more than LoRA + CFG."""
    lora, auto = _lora_vs_autolora(style_evaluators[style], 0.4, QUALITY_GAMMA, 12, LORA_PATHS[style])
    assert auto.style > lora.style + 0.3, f"LoRA+CFG {lora}, AutoLoRA+CFG {auto}"


def test_diversity_is_eq_8():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # pairs: 0, 1/sqrt2, 1/sqrt2
    assert diversity(f) == pytest.approx(1 - (2 ** -0.5) * 2 / 3)
    assert diversity(torch.ones(5, 3)) == pytest.approx(0.0, abs=1e-12)


def test_training_lora_is_what_the_kohya_reader_merges():
    """The training-time hooks and `kohya.merge_into` of the saved keys give the same model."""
    model = load_base(BASE_PATH)
    g = torch.Generator().manual_seed(0)
    lora = TrainingLora(model.kohya_modules(), rank=4, alpha=2.0, g=g)
    with torch.no_grad():
        for _, down, up in lora.factors.values():
            up.normal_(0, 0.05, generator=g)
    x, sigma, labels = torch.randn(3, 1, 8, 8), torch.tensor([0.5, 2.0, 9.0]), torch.tensor([1, 7, 10])
    hooked = model.denoiser(x, sigma, model.text_encoder(labels))
    lora.remove()
    merge_into(factors_from_kohya(lora.kohya_state_dict(), model.kohya_modules()))
    merged = model.denoiser(x, sigma, model.text_encoder(labels))
    torch.testing.assert_close(merged, hooked, atol=1e-4, rtol=1e-4)


def test_training_is_deterministic():
    images, labels = data.load_digits()
    cfg_base = dict(seed=0, steps=3, batch=16, lr=1e-3, warmup=1, ema=0.9, label_dropout=0.1)
    a, b = train_base(images, labels, cfg_base), train_base(images, labels, cfg_base)
    assert fingerprint(a) == fingerprint(b)
    cfg_lora = {**LORA, "steps": 2}
    sd1, subset = train_lora(a, images, labels, cfg_lora)
    sd2, _ = train_lora(b, images, labels, cfg_lora)
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert len(subset) == 2 * data.NUM_DIGITS


def test_demo_command_writes_the_grid(tmp_path, capsys):
    main(["--grid", str(tmp_path / "grid.png"), "--samples", "2", "--scales", "1.0", "--threads", "1"])
    assert (tmp_path / "grid.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "LoRA+CFG" in out and "AutoLoRA+CFG" in out
    assert all(f"LoRA {style!r}:" in out for style in SHIPPED_STYLES)


def test_pixel_diversity_is_zero_for_copies_and_grows_with_distance():
    from demo.metrics import pixel_diversity
    x = torch.rand(1, 1, 8, 8) * 2 - 1
    labels = torch.tensor([0, 0, 1, 1])
    copies = torch.cat([x, x, x, x])
    assert max(abs(v) for v in pixel_diversity(copies, labels)) < 1e-9
    # class 0: x and -x (cosine -1: Eq. 8 gives 2, distance |2x|); class 1: two copies (0, 0)
    cos_div, dist = pixel_diversity(torch.cat([x, -x, x, x]), labels)
    assert abs(cos_div - (2.0 + 0.0) / 2) < 1e-9
    assert abs(dist - float((2 * x).flatten().norm()) / 2) < 1e-6


def test_metric_check_reports_each_metric_of_each_method():
    from research import metric_check
    rows = [(1.0, {"LoRA+CFG": (0.02, 0.05, 1.3), "AutoLoRA+CFG": (0.01, 0.06, 0.9)})]
    text = metric_check.format_rows(rows, 1.5, Settings(), 32)
    assert "1.00 |    0.0200    0.0100  |    0.0500    0.0600  |     1.300     0.900  | no, yes, no" in text
