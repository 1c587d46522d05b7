"""The demo's "Is it the LoRA?" check: the other styles, the variants' recipes, their files, their rows."""
import json

import pytest
import torch

from demo import data
from research import variants
from demo.__main__ import (BASE_PATH, EVALUATORS_PATHS, LORA_PATH, LORA_PATHS, Settings, load_lora_model,
                                        prompts, sample_autolora, sample_lora_cfg)
from demo.metrics import EVALUATORS_FILE, Evaluators, copied_share, pixel_diversity
from research.sweep import claim_holds
from demo.train import EVAL, LORA, SHIPPED_STYLES, load_base, train_evaluators
from demo.kohya import factors_from_kohya

TINY_EVAL = {**EVAL, "epochs": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


def test_styles_render_what_their_names_say(digits):
    x = digits[0][:50]
    styles = data.STYLES
    assert torch.equal(styles[data.STYLE_NAME].apply(x), data.stylize(x))
    assert torch.equal(styles["italic"].apply(x), data.shear(x, data.STYLE_SHEAR))
    assert torch.equal(styles["negative"].apply(x), -x)
    thick = styles["bold"].apply(x)
    assert torch.equal(thick[..., 1:], torch.maximum(x[..., 1:], x[..., :-1]))  # ink spreads right
    assert torch.equal(thick[..., 0], x[..., 0])
    assert (thick > 0).sum() > (x > 0).sum() and thick.min() >= -1 and thick.max() <= 1
    for style in styles.values():  # the styled digit is never one of its own negatives
        styled, negatives = style.apply(x), style.negatives(x).reshape(-1, len(x), 1, 8, 8)
        assert all(not torch.allclose(styled, neg) for neg in negatives), style.name


def test_a_new_styles_evaluators_recognise_it(digits):
    images, labels = digits
    evaluators, report = train_evaluators(images, labels, cfg=TINY_EVAL, style=data.STYLES["bold"])
    _, held_out = data.split(len(labels))
    plain = images[held_out]
    p_bold = torch.sigmoid(evaluators.style(data.bold(plain))).mean()
    p_plain = torch.sigmoid(evaluators.style(plain)).mean()
    assert p_bold > 0.8 and p_plain < 0.2, (p_bold, p_plain)
    accuracy = (evaluators.digit(data.bold(plain)).argmax(1) == labels[held_out]).float().mean()
    assert accuracy > 0.7 and report["style_accuracy_heldout"] > 0.9


def test_variant_recipes_are_the_shipped_one_but_for_the_digits():
    shipped, more = variants.Variant(data.STYLE_NAME, 2), variants.Variant(data.STYLE_NAME, 20)
    assert shipped.shipped and shipped.lora_config() == LORA
    assert not more.shipped
    cfg = more.lora_config()
    assert cfg["per_class"] == 20 and cfg["repeats"] == 1
    assert {k: v for k, v in cfg.items() if k not in ("per_class", "repeats")} == \
           {k: v for k, v in LORA.items() if k not in ("per_class", "repeats")}
    for v in variants.VARIANTS:  # every step sees at least the shipped batch of 80 digits
        assert v.style in data.STYLES
        assert v.per_class * data.NUM_DIGITS * v.lora_config()["repeats"] >= 80
    assert variants.CLAIM_GAMMA in variants.GAMMAS


@pytest.mark.parametrize("style", SHIPPED_STYLES)
def test_a_shipped_variant_uses_the_shipped_files(style, tmp_path):
    files = variants.prepare(variants.Variant(style, 2), tmp_path, log=pytest.fail)
    assert files == variants.Files(LORA_PATHS[style], EVALUATORS_PATHS[style])
    assert not any(tmp_path.iterdir())


def test_prepare_trains_a_variant_reuses_it_and_retrains_on_a_new_recipe(tmp_path):
    variant = variants.Variant("bold", 2)
    tiny = {**variant.lora_config(), "steps": 3}
    logs = []
    files = variants.prepare(variant, tmp_path, lora_cfg=tiny, eval_cfg=TINY_EVAL, log=logs.append)
    assert len(logs) == 2 and files.lora.parent == tmp_path == files.evaluators.parent
    meta = variants._metadata(files.lora)
    assert meta["autolora_demo_style"] == "bold" and len(json.loads(meta["autolora_demo_subset"])) == 20
    model = load_base(BASE_PATH)
    factors = factors_from_kohya(str(files.lora), model.kohya_modules())  # strict: every key maps
    assert len(factors) == len(model.kohya_modules())
    Evaluators.load(files.evaluators)

    stamp = files.lora.stat().st_mtime_ns, files.evaluators.stat().st_mtime_ns
    assert variants.prepare(variant, tmp_path, lora_cfg=tiny, eval_cfg=TINY_EVAL, log=pytest.fail) == files
    assert (files.lora.stat().st_mtime_ns, files.evaluators.stat().st_mtime_ns) == stamp

    logs.clear()
    before = variants._metadata(files.lora)["autolora_demo_training"]
    variants.prepare(variant, tmp_path, lora_cfg={**tiny, "steps": 4}, eval_cfg=TINY_EVAL, log=logs.append)
    assert len(logs) == 1 and "LoRA" in logs[0]
    assert variants._metadata(files.lora)["autolora_demo_training"] != before


def test_a_row_is_the_variants_lora_cfg_and_autolora_on_the_same_seeds():
    files = variants.Files(LORA_PATH, EVALUATORS_FILE)
    settings = Settings(steps=4)
    variant = variants.Variant(data.STYLE_NAME, 2)
    (row,) = variants.measure(variant, files, scales=(0.8,), gammas=(1.5,), samples_per_class=2,
                              settings=settings, first_seed=variants.FIRST_SEED)
    evaluators = Evaluators.load(EVALUATORS_FILE)
    model, factors = load_lora_model(0.8)
    labels, seeds = prompts(2, first_seed=variants.FIRST_SEED)
    lora_images = sample_lora_cfg(model, labels, seeds, settings)
    auto_images = sample_autolora(model, factors, labels, seeds, 1.5, settings)
    lora, auto = evaluators.score(lora_images, labels), evaluators.score(auto_images, labels)
    assert (row.lora, row.autos[1.5]) == (lora, auto)
    assert row.holds == claim_holds(lora, auto)
    assert row.pixels == {1.0: pixel_diversity(lora_images, labels)[0], 1.5: pixel_diversity(auto_images, labels)[0]}
    assert row.holds_in_pixels == (row.pixels[1.5] > row.pixels[1.0])
    digits, digit_labels = data.load_digits()
    styled, trained = data.stylize(digits), torch.zeros(len(digit_labels), dtype=torch.bool)
    trained[data.lora_subset(digit_labels, 2, LORA["subset_seed"])] = True
    pools = styled[trained], digit_labels[trained], styled[~trained], digit_labels[~trained]
    assert row.copied == {1.0: copied_share(lora_images, labels, *pools),
                          1.5: copied_share(auto_images, labels, *pools)}
    assert f"| {'yes' if row.holds else 'no '}   | " in variants.format_row(row)


def test_copied_share_counts_samples_nearest_a_training_digit(digits):
    images, labels = digits
    trained = torch.zeros(len(labels), dtype=torch.bool)
    trained[data.lora_subset(labels, 2, 4)] = True
    pools = images[trained], labels[trained], images[~trained], labels[~trained]
    assert copied_share(images[trained], labels[trained], *pools) == 1.0
    assert copied_share(images[~trained][:40], labels[~trained][:40], *pools) == 0.0
    # a training digit drawn for another class is judged against that class's digits only
    wrong = (labels[trained] + 1) % data.NUM_DIGITS
    assert copied_share(images[trained], wrong, *pools) < 0.5


def test_base_fit_is_the_training_loss_and_tells_a_far_style_from_a_near_one():
    far, plain = variants.base_fit(data.STYLES["negative"])
    near, plain_again = variants.base_fit(data.STYLES["bold"])
    assert plain == plain_again  # same noise for every style: the numbers compare
    assert far > near > plain
    assert variants.base_fit(data.STYLES["bold"], seed=1)[1] != plain
