"""End-to-end checks on SD1.5, once per LoRA mode of the host (A1111: merged and lora_functional;
Forge: merged and online), against a real WebUI server. 64x64, 4 steps: about 1 s per step on a CPU.

Every identity runs first with what most users send, the WebUI's defaults (empty negative prompt,
CFG 7, the UI's default sampler and schedule type, `<lora:name:1>` as "add network to prompt"
writes it), then with the suite's variation (negative prompt "blurry", Euler a).
Order matters: the first test records plain references, the last one proves nothing leaked.
"""
from __future__ import annotations

import base64
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from webui import assert_close, assert_differs, diff, png_b64, with_autolora

ARCH = "sd15"
STEPS = 4


DEFAULTS, VARIATION = "WebUI defaults", "negative prompt, Euler a"
VARIANTS = (DEFAULTS, VARIATION)


def lora_tag(webui, name=None, strength=1):
    return f"<lora:{name or webui.models['lora'].stem}:{strength}>"


def base_req(webui, variant=DEFAULTS, **kw):
    req = {"prompt": "a photo of a cat", "steps": STEPS, "width": 64, "height": 64, "cfg_scale": 7, "seed": 12345}
    req.update(webui.host.spec.archs[ARCH].ui_defaults if variant == DEFAULTS else
               {"negative_prompt": "blurry", "sampler_name": "Euler a"})
    req.update(kw)
    return req


def lora_req(webui, variant=DEFAULTS, **kw):
    req = base_req(webui, variant, **kw)
    req["prompt"] = f"{req['prompt']} {lora_tag(webui)}"
    return req


ON = {"enabled": True}


@pytest.fixture(scope="module")
def all_refs(webui):
    """Plain images (without and with the LoRA) per variant, made before any AutoLoRA call of this mode."""
    return {v: {"plain": webui.txt2img(base_req(webui, v)), "lora": webui.txt2img(lora_req(webui, v))}
            for v in VARIANTS}


@pytest.fixture(scope="module")
def refs(all_refs):
    return all_refs[DEFAULTS]


def test_lora_changes_the_image_and_generation_is_deterministic(webui, all_refs):
    for v in VARIANTS:
        assert_differs(all_refs[v]["plain"].image, all_refs[v]["lora"].image, f"{v}: the LoRA must change the image")
        again = webui.txt2img(lora_req(webui, v))
        assert again.pngs[0] == all_refs[v]["lora"].pngs[0], v
        assert np.isfinite(again.image).all() and again.image.mean() > 5, f"{v}: not a black image"


def test_identity_gamma1_is_the_lora_image_and_base_branch_ran(webui, all_refs):
    for v in VARIANTS:
        out = webui.txt2img(with_autolora(lora_req(webui, v), {"enabled": True, "gamma": 1.0}))
        assert_close(out.image, all_refs[v]["lora"].image, f"{v}: γ=1, w2=CFG vs plain LoRA")
        st = out.stats
        assert st["active"] and st["base_calls"] >= STEPS and st["guided_steps"] >= STEPS, (v, st)
        # The base conditioning was encoded now, or (Forge) reused from an earlier request whose
        # conditioning Forge itself reused: te_base_cached.
        assert st["te_base_encodes"] + st["te_base_cached"] >= 1, st
        assert st["modules"]["unet"] > 0 and st["modules"]["text_encoder"] > 0, st
        assert st["weights_merged"] == (webui.mode == "merged")
        assert not st["notices"], (v, st["notices"])
        assert "AutoLoRA gamma: 1" in out.infotext


def test_identity_gamma0_is_the_image_without_the_lora(webui, all_refs):
    for v in VARIANTS:
        out = webui.txt2img(with_autolora(lora_req(webui, v), {"enabled": True, "gamma": 0.0}))
        assert_close(out.image, all_refs[v]["plain"].image, f"{v}: γ=0, w1=CFG vs prompt without the LoRA tag")
        assert out.stats["guided_steps"] >= STEPS and not out.stats["notices"], (v, out.stats)


def test_default_gamma_differs_from_both_and_repeats_byte_identically(webui, all_refs):
    for v in VARIANTS:
        a = webui.txt2img(with_autolora(lora_req(webui, v), ON))
        b = webui.txt2img(with_autolora(lora_req(webui, v), ON))
        assert_differs(a.image, all_refs[v]["lora"].image, f"{v}: γ=1.5 vs plain LoRA")
        assert_differs(a.image, all_refs[v]["plain"].image, f"{v}: γ=1.5 vs no LoRA")
        assert a.pngs[0] == b.pngs[0], f"{v}: same seed, same settings: byte-identical PNG"
        if v == DEFAULTS:
            webui.g15 = a


def test_disabled_and_no_lora_are_byte_identical_to_the_webui_alone(webui, all_refs):
    for v in VARIANTS:
        off = webui.txt2img(with_autolora(lora_req(webui, v), {"enabled": False, "gamma": 3.0}))
        assert off.pngs[0] == all_refs[v]["lora"].pngs[0], v
        no_lora = webui.txt2img(with_autolora(base_req(webui, v), ON))
        assert no_lora.pngs[0] == all_refs[v]["plain"].pngs[0], v
        assert not no_lora.stats["active"] and any("no LoRA" in n for n in no_lora.stats["notices"])
        assert not any(k.startswith("AutoLoRA") for k in no_lora.info["extra_generation_params"]), \
            "an image AutoLoRA did not guide must not claim it"


def test_cfg_1_blends_the_two_conditional_predictions_on_every_host(webui):
    """At CFG 1 there is no CFG (Forge evaluates no negative prompt): AutoLoRA is the two-evaluation
    blend, w1 and w2 do not apply, with a notice when they were set."""
    plain = webui.txt2img(lora_req(webui, cfg_scale=1))
    g1 = webui.txt2img(with_autolora(lora_req(webui, cfg_scale=1), {"enabled": True, "gamma": 1.0}))
    assert_close(g1.image, plain.image, "CFG 1: γ=1 vs plain LoRA")
    g0 = webui.txt2img(with_autolora(lora_req(webui, cfg_scale=1), {"enabled": True, "gamma": 0.0}))
    assert_close(g0.image, webui.txt2img(base_req(webui, cfg_scale=1)).image, "CFG 1: γ=0 vs no LoRA")
    g15 = webui.txt2img(with_autolora(lora_req(webui, cfg_scale=1), ON))
    explicit = webui.txt2img(with_autolora(lora_req(webui, cfg_scale=1), {"enabled": True, "w1": 5, "w2": 9}))
    assert diff(explicit.image, g15.image) == (0.0, 0), "w1/w2 do not apply at CFG 1"
    assert any("CFG 1" in n for n in explicit.stats["notices"]), explicit.stats["notices"]


def test_extreme_values_within_the_bounds_give_an_image_and_beyond_them_a_422(webui):
    """γ and the CFG scales at the ends of their declared ranges: an image (no HTTP 500); past them: 422."""
    for args in ({"enabled": True, "gamma": 10.0, "w2": 30.0}, {"enabled": True, "gamma": -10.0, "w1": 30.0}):
        status, body = webui.post("/sdapi/v1/txt2img", with_autolora(lora_req(webui), args))
        assert status == 200, (args, status, str(body)[:300])
    status, body = webui.post("/sdapi/v1/txt2img", with_autolora(lora_req(webui), {"enabled": True, "gamma": 1e30}))
    assert status == 422 and "'gamma' must be between -10 and 10" in str(body), body


SAMPLERS = [("Euler a", None), ("DPM++ 2M", "Karras"), ("DPM++ SDE", None), ("DDIM", None), ("UniPC", None)]


def test_samplers(webui):
    # One test, not parametrized: pytest moves parametrized items after the module's other tests,
    # and the last test (nothing leaked) must stay last.
    failures = []
    for sampler, scheduler in SAMPLERS:
        kw = {"sampler_name": sampler, **({"scheduler": scheduler} if scheduler else {})}
        plain = webui.txt2img(lora_req(webui, **kw))
        out = webui.txt2img(with_autolora(lora_req(webui, **kw), {"enabled": True, "gamma": 1.0}))
        try:
            assert_close(out.image, plain.image, f"{sampler} {scheduler or ''}: γ=1 vs plain LoRA")
            # Every denoiser call of the sampler was guided (A1111's DDIM makes steps - 1 of them,
            # DPM++ SDE two per step), and each ran the base branch.
            st = out.stats
            assert st["guided_steps"] >= STEPS - 1 and st["plain_steps"] == 0, st
            assert st["base_calls"] >= st["guided_steps"], st
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, failures


def test_cfg_pp_samplers_renoise_with_the_sampled_model(webui):
    """CFG++ samplers (Forge Neo) renoise with the unconditional prediction: γ 1 must still be the
    plain LoRA image and γ 0 the image without the LoRA, at the UI's CFG and at the CFG they are
    meant for."""
    names = [s["name"] for s in webui.get("/sdapi/v1/samplers") if s["name"].endswith("CFG++")]
    if not names:
        pytest.skip(f"{webui.host_name} offers no CFG++ sampler")
    failures = []
    for sampler in [n for n in ("Euler a CFG++", "DPM++ 2M CFG++", "DDIM CFG++") if n in names] or names[:2]:
        for cfg in (webui.host.spec.archs[ARCH].ui_defaults.get("cfg_scale", 7), 1.5):
            kw = {"sampler_name": sampler, "cfg_scale": cfg}
            plain, lora = webui.txt2img(base_req(webui, **kw)), webui.txt2img(lora_req(webui, **kw))
            g1 = webui.txt2img(with_autolora(lora_req(webui, **kw), {"enabled": True, "gamma": 1.0}))
            g0 = webui.txt2img(with_autolora(lora_req(webui, **kw), {"enabled": True, "gamma": 0.0}))
            try:
                assert_differs(plain.image, lora.image, f"{sampler} CFG {cfg}: the LoRA must change the image")
                assert_close(g1.image, lora.image, f"{sampler} CFG {cfg}: γ=1 vs plain LoRA")
                assert_close(g0.image, plain.image, f"{sampler} CFG {cfg}: γ=0 vs no LoRA")
                # every model call guided (A1111's DDIM CFG++, a timesteps sampler, makes steps - 1)
                assert g0.stats["guided_steps"] >= STEPS - 1 and g0.stats["plain_steps"] == 0, g0.stats
            except AssertionError as exc:
                failures.append(str(exc))
    assert not failures, failures


def test_hires_fix_guides_both_passes(webui):
    kw = dict(enable_hr=True, hr_scale=2, hr_upscaler=webui.hr_upscaler, hr_second_pass_steps=2, denoising_strength=0.6)
    plain = webui.txt2img(lora_req(webui, **kw))
    out = webui.txt2img(with_autolora(lora_req(webui, **kw), {"enabled": True, "gamma": 1.0}))
    assert out.image.shape[:2] == (128, 128)
    assert_close(out.image, plain.image, "hires fix: γ=1 vs plain LoRA")
    assert out.stats["guided_steps"] > STEPS, "the hires pass must be guided too"
    assert out.stats["te_base_encodes"] + out.stats["te_base_cached"] >= 2, \
        "the hires pass has its own (base) conditioning"
    g0 = webui.txt2img(with_autolora(lora_req(webui, **kw), {"enabled": True, "gamma": 0.0}))
    assert_close(g0.image, webui.txt2img(base_req(webui, **kw)).image, "hires fix: γ=0 vs no LoRA")


def test_img2img_via_webuiapi(webui, refs):
    import webuiapi  # the PyPI client users call the API with (tests/e2e/requirements.txt)
    api = webuiapi.WebUIApi(baseurl=webui.url + "/sdapi/v1")
    init = Image.fromarray(refs["plain"].image.astype(np.uint8))
    for v in VARIANTS:
        common = dict(images=[init], steps=STEPS, width=64, height=64, cfg_scale=7, seed=777, denoising_strength=0.7,
                      **{k: val for k, val in base_req(webui, v).items() if k in ("negative_prompt", "sampler_name",
                                                                                    "scheduler")})
        # A1111 quirk (seen without the extension): an img2img right after a txt2img differs from the same
        # img2img after an img2img (3.8/255 on average here); so the first img2img is a warm-up.
        api.img2img(prompt="a photo of a dog", **common)
        plain = api.img2img(prompt="a photo of a dog", **common)
        lora = api.img2img(prompt="a photo of a dog " + lora_tag(webui), **common)
        g0 = api.img2img(prompt="a photo of a dog " + lora_tag(webui), **common,
                         alwayson_scripts={"AutoLoRA": {"args": [{"enabled": True, "gamma": 0.0}]}})
        g1 = api.img2img(prompt="a photo of a dog " + lora_tag(webui), **common,
                         alwayson_scripts={"AutoLoRA": {"args": [{"enabled": True, "gamma": 1.0}]}})
        assert_close(np.asarray(g0.image), np.asarray(plain.image), f"{v}: img2img: γ=0 vs no LoRA")
        assert_close(np.asarray(g1.image), np.asarray(lora.image), f"{v}: img2img: γ=1 vs plain LoRA")
        assert webui.stats()["guided_steps"] > 0


def test_inpaint_with_mask(webui, refs):
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    req = lora_req(webui, init_images=[png_b64(refs["plain"].image)], mask=png_b64(np.stack([mask] * 3, -1)),
                   denoising_strength=0.8, inpainting_fill=1, inpaint_full_res=False, mask_blur=0)
    webui.img2img(req)  # warm-up: see test_img2img_via_webuiapi
    plain = webui.img2img(req)
    out = webui.img2img(with_autolora(req, {"enabled": True, "gamma": 1.0}))
    assert_close(out.image, plain.image, "inpaint: γ=1 vs plain LoRA")
    g15 = webui.img2img(with_autolora(req, ON))
    assert_differs(g15.image[:, 32:], plain.image[:, 32:], "inpaint: γ=1.5 changes the masked half")
    assert diff(g15.image[:, :20], plain.image[:, :20])[0] < 0.5, "inpaint: the unmasked side is kept"


def test_batch_size_and_batch_count(webui):
    kw = dict(batch_size=2, n_iter=2)
    plain = webui.txt2img(lora_req(webui, **kw))
    out = webui.txt2img(with_autolora(lora_req(webui, **kw), {"enabled": True, "gamma": 1.0}))
    assert len(out.images) == len(plain.images) >= 4
    for i, (a, b) in enumerate(zip(out.images, plain.images)):
        assert_close(a, b, f"batch image {i}: γ=1 vs plain LoRA")
    assert out.stats["guided_steps"] == 2 * STEPS
    g0 = webui.txt2img(with_autolora(lora_req(webui, **kw), {"enabled": True, "gamma": 0.0}))
    for i, (a, b) in enumerate(zip(g0.images, webui.txt2img(base_req(webui, **kw)).images)):
        assert_close(a, b, f"batch image {i}: γ=0 vs no LoRA")


def test_and_prompt(webui):
    for v in VARIANTS:
        req = base_req(webui, v, prompt=f"a photo of a cat AND a red ball :0.6 {lora_tag(webui)}")
        plain = webui.txt2img(req)
        out = webui.txt2img(with_autolora(req, {"enabled": True, "gamma": 1.0}))
        assert_close(out.image, plain.image, f"{v}: AND prompt: γ=1 vs plain LoRA")
        g0 = webui.txt2img(with_autolora(req, {"enabled": True, "gamma": 0.0}))
        assert_close(g0.image, webui.txt2img(base_req(webui, v, prompt="a photo of a cat AND a red ball :0.6")).image,
                     f"{v}: AND prompt: γ=0 vs no LoRA")


def test_two_loras_only_one_guided(webui):
    a, b = webui.models["lora"].stem, webui.models["lora_b"].stem
    for v in VARIANTS:
        req = base_req(webui, v, prompt=f"a photo of a cat <lora:{a}:1> <lora:{b}:0.8>")
        out = webui.txt2img(with_autolora(req, {"enabled": True, "gamma": 0.0, "guided_loras": a}))
        if not webui.tells_loras_apart:  # the honest fallback: the WebUI's image, a notice, no claim
            assert diff(out.image, webui.txt2img(req).image) == (0.0, 0), f"{v}: not the WebUI's own image"
            assert any("which LoRA a patch comes from" in n for n in out.stats["notices"]), out.stats
            assert "AutoLoRA gamma" not in out.infotext and out.stats["guided_steps"] == 0, out.infotext
            continue
        only_b = webui.txt2img(base_req(webui, v, prompt=f"a photo of a cat <lora:{b}:0.8>"))
        assert_close(out.image, only_b.image, f"{v}: γ=0 guiding only A: the base keeps B")
        assert out.stats["guided_loras"] == [a]
        both = webui.txt2img(req)
        assert_differs(only_b.image, both.image, "A must matter")


def test_lora_at_strength_zero(webui):
    for v in VARIANTS:
        req = base_req(webui, v, prompt=f"a photo of a cat {lora_tag(webui, strength=0)}")
        plain = webui.txt2img(req)
        out = webui.txt2img(with_autolora(req, ON))
        assert_close(out.image, plain.image, f"{v}: strength 0: base == LoRA branch, any γ gives the plain image")


def test_guidance_interval(webui, refs):
    full = getattr(webui, "g15", None) or webui.txt2img(with_autolora(lora_req(webui), ON))
    # the first half: late steps of a 4-step run move few pixels (0.25/255 on Forge's random SD1.5)
    half = webui.txt2img(with_autolora(lora_req(webui), {"enabled": True, "start": 0.0, "end": 0.5}))
    assert half.stats["guided_steps"] == STEPS // 2 and half.stats["plain_steps"] == STEPS - STEPS // 2
    assert half.stats["base_calls"] == STEPS // 2
    assert_differs(half.image, refs["lora"].image, "interval [0, 0.5] vs plain LoRA")
    assert diff(half.image, full.image)[0] > 0, "interval [0, 0.5] vs full interval"
    empty = webui.txt2img(with_autolora(lora_req(webui), {"enabled": True, "start": 1.0, "end": 1.0}))
    assert diff(empty.image, refs["lora"].image) == (0.0, 0), "an empty interval is exactly the plain LoRA run"
    assert empty.stats["base_calls"] == 0 and empty.stats["guided_steps"] == 0


def _xyz_args(webui, axis_label, values):
    """`values`: the text of a number axis, or the list of choices of a choice-valued axis (the
    X/Y/Z script reads those from its dropdown, x_values_dropdown). Every other arg is the script's
    UI default as `script-info` lists it (hosts add args: Forge Neo 2.x's row count), but the sub
    images, which the cells are compared by."""
    info = webui.get("/sdapi/v1/script-info")
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    labels = xyz["args"][0]["choices"]
    assert axis_label in labels, f"{axis_label} not among the X/Y/Z axes"
    text, dropdown = (", ".join(values), list(values)) if isinstance(values, list) else (values, [])
    args = [a.get("value") for a in xyz["args"]]
    for i, arg in enumerate(xyz["args"]):  # the axis types are index dropdowns: the UI sends the index
        if arg.get("label") in ("X type", "Y type", "Z type") and arg.get("value") in labels:
            args[i] = labels.index(arg["value"])
    args[0], args[1], args[2] = labels.index(axis_label), text, dropdown  # x_type, x_values, x_values_dropdown
    for i, arg in enumerate(xyz["args"]):
        if arg.get("label") == "Include Sub Images":
            args[i] = True
    return args


def test_xyz_axis_cells_equal_single_calls(webui):
    req = with_autolora(lora_req(webui), ON)
    req.update(script_name="x/y/z plot", script_args=_xyz_args(webui, "[AutoLoRA] γ (AutoLoRA scale)", "1, 2.5"))
    grid = webui.txt2img(req)
    assert len(grid.images) >= 3, "grid + two cells"
    cells = grid.images[-2:]
    for gamma, cell in zip((1.0, 2.5), cells):
        single = webui.txt2img(with_autolora(lora_req(webui), {"enabled": True, "gamma": gamma}))
        assert diff(cell, single.image) == (0.0, 0), f"X/Y/Z cell γ={gamma} vs the single call"
    assert grid.images[0].shape[1] >= 128, "the grid holds both cells"


def test_guidance_controls_through_the_api_and_xyz(webui, refs):
    """The controls' identities on the real WebUI, with its default inputs: base strength 1 gives the
    plain LoRA image at any γ, a cap of 0 the image without the LoRA (γ 0), a schedule at γ 1 the
    plain LoRA image; a schedule and a cap change the image at γ 2; the hires pass takes its own γ;
    X/Y/Z cells of the schedule axis (its choices) and the cap axis equal single calls."""
    same = webui.txt2img(with_autolora(lora_req(webui), {"enabled": True, "gamma": 3.0, "base_strength": 1.0,
                                                        "base_text_encoder": False}))
    assert_close(same.image, refs["lora"].image, "base strength 1: the plain LoRA image at γ 3")
    g0 = webui.txt2img(with_autolora(lora_req(webui), {"enabled": True, "gamma": 0.0}))
    capped = webui.txt2img(with_autolora(lora_req(webui), {"enabled": True, "gamma": 2.5, "cap": 0.0}))
    assert_close(capped.image, g0.image, "cap 0: the base image at γ 2.5")
    for schedule in ("early", "late", "middle"):
        out = webui.txt2img(with_autolora(lora_req(webui), {"enabled": True, "gamma": 1.0, "schedule": schedule}))
        assert_close(out.image, refs["lora"].image, f"schedule {schedule} at γ 1: the plain LoRA image")
    g2 = webui.txt2img(with_autolora(lora_req(webui), {"enabled": True, "gamma": 2.0}))
    late = webui.txt2img(with_autolora(lora_req(webui), {"enabled": True, "gamma": 2.0, "schedule": "late"}))
    assert diff(late.image, g2.image)[0] > 0, "a late schedule moves γ off the early steps"
    cap = webui.txt2img(with_autolora(lora_req(webui), {"enabled": True, "gamma": 2.0, "cap": 0.1}))
    assert diff(cap.image, g2.image)[0] > 0, "a tight cap changes the γ 2 image"
    weak = webui.txt2img(with_autolora(lora_req(webui), {"enabled": True, "gamma": 2.0, "base_strength": 0.5}))
    assert diff(weak.image, g2.image)[0] > 0, "a weaker copy of the LoRA as the base guides otherwise"
    hires = dict(enable_hr=True, hr_scale=2, hr_upscaler=webui.hr_upscaler, hr_second_pass_steps=2,
                 denoising_strength=0.6)
    same_gamma = webui.txt2img(with_autolora(lora_req(webui, **hires), {"enabled": True, "gamma": 1.5}))
    own_gamma = webui.txt2img(with_autolora(lora_req(webui, **hires), {"enabled": True, "gamma": 1.5, "hr_gamma": 1.0}))
    assert diff(own_gamma.image, same_gamma.image)[0] > 0, "the hires pass's own γ"
    assert "AutoLoRA hires gamma: 1" in own_gamma.infotext
    axes = (("[AutoLoRA] γ schedule", ["constant", "late"], [{"schedule": "constant"}, {"schedule": "late"}]),
            ("[AutoLoRA] Push cap", "-1, 0", [{"cap": None}, {"cap": 0.0}]))
    for axis, values, args in axes:
        req = with_autolora(lora_req(webui), {"enabled": True, "gamma": 2.0})
        req.update(script_name="x/y/z plot", script_args=_xyz_args(webui, axis, values))
        grid = webui.txt2img(req)
        for extra, cell in zip(args, grid.images[-2:]):
            single = webui.txt2img(with_autolora(lora_req(webui), {"enabled": True, "gamma": 2.0, **extra}))
            assert diff(cell, single.image) == (0.0, 0), f"X/Y/Z {axis} cell {extra} vs the single call"


def test_infotext_paste_round_trip_of_every_control(webui):
    a = webui.models["lora"].stem
    settings = {"enabled": True, "gamma": 1.2, "w1": 5.0, "w2": 6.0, "lora_scale": 0.8, "start": 0.25,
                "end": 0.75, "guided_loras": a, "strategy": "sequential", "base_text_encoder": False,
                "schedule": "middle", "schedule_power": 2.0, "schedule_floor": 0.25, "cap": 1.5, "base_strength": 0.25,
                "hr_gamma": 2.0}
    first = webui.txt2img(with_autolora(lora_req(webui), settings))
    assert first.stats["strategy"] == "sequential"
    for key in ("AutoLoRA gamma: 1.2", "AutoLoRA w1: 5", "AutoLoRA w2: 6", "AutoLoRA LoRA scale: 0.8",
                "AutoLoRA start: 0.25", "AutoLoRA end: 0.75", f"AutoLoRA guided: {a}", "AutoLoRA strategy: sequential",
                "AutoLoRA base TE: False", "AutoLoRA schedule: middle", "AutoLoRA schedule power: 2",
                "AutoLoRA schedule floor: 0.25", "AutoLoRA cap: 1.5", "AutoLoRA base strength: 0.25",
                "AutoLoRA hires gamma: 2"):
        assert key in first.infotext, key
    # The API's `infotext` field goes through the same paste functions as PNG Info -> Send to txt2img.
    pasted = webui.txt2img({"infotext": first.infotext})
    want = dict(first.stats["settings"])
    assert pasted.stats["settings"] == want, (pasted.stats["settings"], want)
    assert diff(pasted.image, first.image) == (0.0, 0)
    # PNG Info parses the PNG's text with the same parser (infotext_utils.parse_generation_parameters).
    status, info = webui.post("/sdapi/v1/png-info", {"image": base64.b64encode(first.pngs[0]).decode()})
    assert status == 200 and info["parameters"]["AutoLoRA gamma"] == "1.2", info
    assert info["parameters"]["AutoLoRA strategy"] == "sequential"
    # The default `auto`: the infotext names the strategy it picked, and pasting restores `auto`.
    auto = webui.txt2img(with_autolora(lora_req(webui), {"enabled": True}))
    assert f"AutoLoRA strategy: {auto.stats['strategy']} (auto)" in auto.infotext, auto.infotext
    assert webui.txt2img({"infotext": auto.infotext}).stats["settings"]["strategy"] == "auto"


def test_each_strategy(webui):
    ref = webui.txt2img(with_autolora(lora_req(webui), {"enabled": True, "strategy": "batched"}))
    for name in ("dual", "sequential", "swap"):
        out = webui.txt2img(with_autolora(lora_req(webui), {"enabled": True, "strategy": name}))
        assert_close(out.image, ref.image, f"strategy {name} vs batched")
        if webui.mode == "merged" or name == "sequential":
            assert out.stats["strategy"] == name, out.stats
        else:  # dual and swap need merged weights: batched, with a notice
            assert out.stats["strategy"] == "batched" and out.stats["notices"], out.stats


BAD = [
    ({"enabled": True, "gama": 1.5}, "unknown argument"),
    ([True, "NaN"], "finite"),
    ([True, "1.5x"], "must be a number"),
    ({"enabled": True, "w1": -3}, "'w1' must be between 0 and 30"),
    ({"enabled": True, "gamma": 11}, "'gamma' must be between -10 and 10"),
    ({"enabled": True, "lora_scale": 5}, "'lora_scale' must be between 0 and 4"),
    ({"enabled": True, "start": 0.9, "end": 0.1}, "must not exceed"),
    ({"enabled": True, "strategy": "fastest"}, "must be one of"),
    ({"enabled": True, "guided_loras": "no_such_lora"}, "not in the prompt"),
    ([True] * 21, "positional args, expected at most"),  # 16 args and the UI's 4 unset boxes are the most
    ({"enabled": True, "lora_scale": [1]}, "must be a number"),
]


def test_bad_api_values_are_rejected_with_a_message(webui):
    for args, message in BAD:  # a loop, not parametrized: see test_samplers
        status, body = webui.post("/sdapi/v1/txt2img", with_autolora(lora_req(webui), args))
        assert status == 422 and message in str(body), (args, status, body)
    status, body = webui.post("/sdapi/v1/img2img", with_autolora(
        lora_req(webui, init_images=[png_b64(np.zeros((64, 64, 3)))]), [True, "inf"]))
    assert status == 422 and "finite" in str(body), body


def test_single_dict_args_form(webui):
    req = lora_req(webui)
    req["alwayson_scripts"] = {"AutoLoRA": {"args": {"enabled": True, "gamma": 1.0}}}
    out = webui.txt2img(req)
    assert out.stats["active"] and out.stats["settings"]["gamma"] == 1.0


def test_interrupt_mid_run_leaves_nothing_behind(webui, refs):
    done = {}

    def run():
        done["result"] = webui.post("/sdapi/v1/txt2img", with_autolora(lora_req(webui, steps=40), ON))

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.time() + 300
    while time.time() < deadline:
        progress = webui.get("/sdapi/v1/progress?skip_current_image=true")
        if progress["state"]["sampling_step"] >= 2:
            break
        time.sleep(0.5)
    webui.post("/sdapi/v1/interrupt", {})
    worker.join(600)
    assert done["result"][0] == 200
    assert webui.stats()["guided_steps"] < 40


# Forge's built-in guidance extensions, as their scripts' ui() returns their args (enabled first).
# Dynamic thresholding at mimic scale 3 / percentile 0.9 visibly changes the image at CFG 7.
PAG = "PerturbedAttentionGuidance Integrated"
DYNTHRES = "DynamicThresholding (CFG-Fix) Integrated"
FREEU = "FreeU Integrated (SD 1.x, SD 2.x, SDXL)"
def test_a_lora_named_twice_is_removed_twice(webui):
    """`<lora:x:1> <lora:x:1>`: a WebUI that applies the LoRA twice gets a base branch without either
    copy (γ 0 = the image without the tag), and γ 1 is its own image of the doubled prompt."""
    twice = lora_req(webui, prompt=f"a photo of a cat {lora_tag(webui)}")
    g0 = webui.txt2img(with_autolora(twice, {"enabled": True, "gamma": 0.0}))
    assert_close(g0.image, webui.txt2img(base_req(webui)).image, "LoRA named twice: γ=0 vs no LoRA")
    g1 = webui.txt2img(with_autolora(twice, {"enabled": True, "gamma": 1.0}))
    assert_close(g1.image, webui.txt2img(twice).image, "LoRA named twice: γ=1 vs the plain image of that prompt")


def test_forge_reuses_the_base_conditioning_while_forge_reuses_its_own(webui):
    """Forge hands back its cached conditioning while prompt, steps, LoRAs, size... are unchanged;
    AutoLoRA then reuses its base conditioning instead of encoding both prompts again, and the image
    is the one a fresh encoding gives. Another LoRA scale (part of what the base branch's text
    conditioning depends on) or another prompt encodes again."""
    if webui.host.spec.family != "forge":
        pytest.skip("A1111 encodes the base conditioning per generation")
    prompt = "a cat on a sofa"  # a prompt no other test uses: a fresh Forge cache (lora_req adds the tag)
    g0 = {"enabled": True, "gamma": 0.0}
    first = webui.txt2img(with_autolora(lora_req(webui, prompt=prompt, seed=5), g0))
    assert first.stats["te_base_encodes"] >= 1 and first.stats["te_base_cached"] == 0, first.stats
    again = webui.txt2img(with_autolora(lora_req(webui, prompt=prompt, seed=5), g0))
    assert again.stats["te_base_encodes"] == 0 and again.stats["te_base_cached"] >= 1, again.stats
    assert again.stats["modules"]["text_encoder"] == first.stats["modules"]["text_encoder"] > 0
    assert again.pngs[0] == first.pngs[0], "the reused base conditioning gives the same image"
    assert_close(again.image, webui.txt2img(base_req(webui, prompt="a cat on a sofa", seed=5)).image,
                 "γ=0 with the reused base conditioning vs no LoRA")
    scaled = webui.txt2img(with_autolora(lora_req(webui, prompt=prompt, seed=5), dict(g0, lora_scale=0.5)))
    assert scaled.stats["te_base_encodes"] >= 1, "another LoRA scale must encode again"


FORGE_GUIDANCE = {
    PAG: [True, 3.0, 0.0, 0.0, 1.0],
    DYNTHRES: [True, 3.0, 0.9, "Constant", 0.0, "Constant", 0.0, 1.0, "enable", "MEAN", "AD", 1.0],
    FREEU: [True, 1.01, 1.02, 0.99, 0.95, 0.0, 1.0],
}


def test_forge_guidance_extensions_enabled_together(webui):
    """Forge's perturbed attention, dynamic thresholding and FreeU enabled with AutoLoRA.

    With dynamic thresholding (which changes the image here) and PAG: both identities hold and
    γ=1.5 differs. All three at once: no crash, AutoLoRA active. On these random weights FreeU turns
    the image black with or without AutoLoRA, so its images are not compared (docs/forge.md)."""
    if webui.host.spec.family != "forge":
        pytest.skip("Forge's built-in guidance extensions")
    listed = {s["name"] for s in webui.get("/sdapi/v1/script-info") if s.get("is_alwayson")}
    missing = [name for name in FORGE_GUIDANCE if name.lower() not in {n.lower() for n in listed}]
    if missing:  # Forge Neo ships none of them
        pytest.skip(f"{webui.host_name} does not ship {', '.join(missing)}")

    def req(base, names, autolora=None):
        out = dict(base, alwayson_scripts={k: {"args": FORGE_GUIDANCE[k]} for k in names})
        if autolora is not None:
            out["alwayson_scripts"]["AutoLoRA"] = {"args": [autolora]}
        return out

    # Dynamic thresholding is made for high CFG: at the UI's CFG 7 its clamp barely binds on these
    # random weights (a mean pixel change under 1 once the text encoders' final norm has a bias),
    # at CFG 15 it changes the image, so the identities below can show it is applied in both branches.
    high_cfg = {"cfg_scale": 15}
    alone = webui.txt2img(lora_req(webui, **high_cfg))
    with_dt = webui.txt2img(req(lora_req(webui, **high_cfg), [DYNTHRES]))
    assert_differs(with_dt.image, alone.image, "dynamic thresholding must change the image")
    both = [PAG, DYNTHRES]
    plain = webui.txt2img(req(lora_req(webui, **high_cfg), both))
    assert "pagi_scale: 3" in plain.infotext, "PAG must really be on"
    g1 = webui.txt2img(req(lora_req(webui, **high_cfg), both, {"enabled": True, "gamma": 1.0}))
    assert g1.stats["active"] and g1.stats["base_calls"] >= STEPS, g1.stats
    assert_close(g1.image, plain.image, "PAG + dynamic thresholding: γ=1 vs plain LoRA")
    g0 = webui.txt2img(req(lora_req(webui, **high_cfg), [DYNTHRES], {"enabled": True, "gamma": 0.0}))
    assert_close(g0.image, webui.txt2img(req(base_req(webui, **high_cfg), [DYNTHRES])).image,
                 "dynamic thresholding: γ=0 vs no LoRA")
    assert_differs(webui.txt2img(req(lora_req(webui, **high_cfg), both, ON)).image, plain.image, "γ=1.5 with PAG + DT")
    all_three = webui.txt2img(req(lora_req(webui), list(FORGE_GUIDANCE), ON))
    assert all_three.stats["active"] and all_three.stats["base_calls"] >= STEPS, all_three.stats
    assert "freeu_b1" in all_three.infotext and "pagi_scale" in all_three.infotext


def test_nothing_leaked_plain_images_unchanged(webui, refs):
    """After every AutoLoRA call above (and the interrupted one, and the rejected ones)."""
    assert webui.txt2img(base_req(webui)).pngs[0] == refs["plain"].pngs[0]
    assert webui.txt2img(lora_req(webui)).pngs[0] == refs["lora"].pngs[0]


def test_ui_controls_tooltips_and_settings(webui):
    """The Gradio UI has every control under the ids javascript/autolora.js looks up, the page loads
    that script, its tooltip table is served, and the Settings page has the AutoLoRA section."""
    config = webui.get("/config")
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    table = webui.get("/autolora/v1/params")
    for tab in ("txt2img", "img2img"):  # the tooltips travel in the page (an HTML component's value)
        assert f'id=\\"autolora_{tab}_tooltips\\"' in json.dumps(config) or \
            f'id="autolora_{tab}_tooltips"' in str(config), tab
    for tab in ("txt2img", "img2img"):
        for param in table["params"]:
            assert f"autolora_{tab}_{param['name']}" in ids, (tab, param["name"])
    assert all(p["tooltip"] for p in table["params"]) and table["arg_order"][0] == "enabled"
    import urllib.request
    with urllib.request.urlopen(webui.url + "/", timeout=120) as resp:
        assert b"autolora.js" in resp.read()
    assert {"setting_autolora_default_strategy", "setting_autolora_swap_budget_mb"} <= ids, "Settings → AutoLoRA"
    options = webui.get("/sdapi/v1/options")  # Forge lists only the options that were ever set
    assert options.get("autolora_default_strategy", "auto") == "auto"
    assert options.get("autolora_swap_budget_mb", 0) == 0
