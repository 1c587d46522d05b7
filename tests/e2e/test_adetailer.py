"""AutoLoRA in Bing-su/adetailer's detailer pass, on a real WebUI (SD1.5), offline.

ADetailer runs a second, inpainting pass per face it detects, with only the AlwaysOn scripts its
setting "Script names to apply to ADetailer" (`ad_script_names`, matched against each script's file
name; AutoLoRA's is `autolora`) names, while "Apply only selected scripts to ADetailer"
(`ad_only_selected_scripts`) is on, as it is by default.

The checkpoint draws random weights, so the face comes from a photo: scikit-image's astronaut (from
the WebUI's own venv), detected by mediapipe's face model, which ships inside the mediapipe wheel.
The request is an img2img with ADetailer's "Skip img2img" (its second positional arg): the first
pass runs one throw-away step, and ADetailer detects on, and inpaints the face of, the init image.
So the image returned is the detailer pass's alone: with AutoLoRA in the allow-list γ 1 must give
the detailer image without AutoLoRA and γ 0 the one of the prompt without the LoRA; with ADetailer's
default list the detailer pass runs without AutoLoRA and the image is the one without AutoLoRA,
byte for byte. `/autolora/v1/stats` counts AutoLoRA's generations: the first pass is one, a guided
detailer pass one more, with its own guided steps and base-branch evaluations.

The extension: AUTOLORA_E2E_ADETAILER (tests/e2e/install/extension.sh adetailer WEBUI, which also
installs its requirements), or a copy installed in the WebUI's extensions/ (extensions.py).
"""
from __future__ import annotations

import base64
import io
import subprocess

import numpy as np
import pytest
from PIL import Image

from extensions import ADETAILER, start_with, stop
from webui import assert_close, assert_differs, diff

ARCH = "sd15"
STEPS = 4
FACE_SIZE = 256  # the init image; mediapipe finds the astronaut's face at 128 px and more
AD_DENOISE = 0.75  # the detailer pass runs int(0.75 * STEPS) = 3 steps
# ADetailer's default "Script names to apply to ADetailer" (adetailer/args.py, SCRIPT_DEFAULT)
AD_SCRIPT_DEFAULT = "dynamic_prompting,dynamic_thresholding,lora_block_weight,negpip,wildcard_recursive,wildcards"
AD_ARGS = {"ad_model": "mediapipe_face_full", "ad_denoising_strength": AD_DENOISE}
# the astronaut's face in the 256 px image (mediapipe's box, 0.34..0.54 x 0.13..0.34 of the image), and
# a region far from it that the detailer pass must leave alone (her suit below the shoulders)
FACE = (slice(34, 87), slice(87, 139))
FAR = (slice(170, 256), slice(0, 256))


@pytest.fixture(scope="module")
def face_png(host) -> str:
    if host is None:
        pytest.skip("e2e: no WebUI configured")
    code = ("import base64, io, sys; from PIL import Image; from skimage import data; "
            "b = io.BytesIO(); Image.fromarray(data.astronaut()).resize((int(sys.argv[1]),) * 2, Image.LANCZOS)"
            ".save(b, format='PNG'); print(base64.b64encode(b.getvalue()).decode())")
    out = subprocess.run([str(host.python), "-c", code, str(FACE_SIZE)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        pytest.skip(f"scikit-image's astronaut is not in {host.python}'s venv: {out.stderr.strip()[-300:]}")
    return out.stdout.strip()


@pytest.fixture(scope="module")
def webui(pool, host, face_png):
    # --ad-no-huggingface: ADetailer does not try to download its YOLO models (no hub here); the
    # mediapipe models are listed all the same.
    server, client = start_with(pool, host, ADETAILER, ("--ad-no-huggingface",))
    try:
        models = client.get("/adetailer/v1/ad_model")["ad_model"]
        assert AD_ARGS["ad_model"] in models, models
        client.set_options({"ad_only_selected_scripts": True, "ad_script_names": AD_SCRIPT_DEFAULT})
        client.img2img(ad_req(client, face_png))  # warm-up (test_sd15.py: A1111's first img2img differs)
    except BaseException:
        stop(server, client)
        raise
    yield client
    stop(server, client)


def ad_req(webui, face_png, autolora=None, lora=True):
    prompt = "a photo of an astronaut" + (f" <lora:{webui.models['lora'].stem}:1>" if lora else "")
    req = {"prompt": prompt, "steps": STEPS, "width": 64, "height": 64, "cfg_scale": 7, "seed": 31337,
           "init_images": [face_png], "denoising_strength": 0.75}
    req.update(webui.host.spec.archs[ARCH].ui_defaults)
    # ADetailer's positional args: enabled, skip img2img, then one dict per tab
    req["alwayson_scripts"] = {"ADetailer": {"args": [True, True, dict(AD_ARGS)]}}
    if autolora is not None:
        req["alwayson_scripts"]["AutoLoRA"] = {"args": [autolora]}
    return req


def init_image(face_png):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(face_png))).convert("RGB")).astype(np.int16)


def test_adetailer_finds_the_face_offline_and_redraws_only_it(webui, face_png):
    out = webui.img2img(ad_req(webui, face_png, {"enabled": False}))
    init = init_image(face_png)
    assert out.image.shape == init.shape, (out.image.shape, init.shape)
    assert_differs(out.image[FACE], init[FACE], "the detailer pass redraws the face")
    assert diff(out.image[FAR], init[FAR])[0] < 0.5, "far from the face the init image is kept"
    assert "ADetailer model: mediapipe_face_full" in out.infotext, out.infotext
    assert not any(k.startswith("AutoLoRA") for k in out.info["extra_generation_params"]), out.infotext


def test_by_default_adetailers_pass_runs_without_autolora(webui, face_png):
    """ADetailer's default allow-list lacks `autolora`: its pass is the one without AutoLoRA, and only
    the first pass is an AutoLoRA generation."""
    webui.set_options({"ad_script_names": AD_SCRIPT_DEFAULT})
    off = webui.img2img(ad_req(webui, face_png, {"enabled": False}))
    before = webui.stats().get("generation", 0)
    on = webui.img2img(ad_req(webui, face_png, {"enabled": True}))
    st = on.stats
    assert st["generation"] == before + 1, ("the first pass alone is an AutoLoRA generation", st)
    assert st["finished"] and st["failure"] is None, st
    # the record is the first pass's: its one step (ADetailer's "Skip img2img"), not the detailer pass's
    assert 1 <= st["guided_steps"] < int(AD_DENOISE * STEPS), st
    assert diff(on.image, off.image) == (0.0, 0), \
        "the detailer pass without AutoLoRA in its allow-list is the image without AutoLoRA"
    assert "AutoLoRA ADetailer" not in on.infotext, ("no claim for a pass AutoLoRA did not run in", on.infotext)


def test_with_autolora_in_adetailers_script_names_its_pass_is_guided(webui, face_png):
    webui.set_options({"ad_script_names": AD_SCRIPT_DEFAULT + ",autolora"})
    off = webui.img2img(ad_req(webui, face_png, {"enabled": False}))
    before = webui.stats().get("generation", 0)
    on = webui.img2img(ad_req(webui, face_png, {"enabled": True}))
    st = on.stats
    # the first pass, then the detailer pass: the record is the detailer pass's
    assert st["generation"] == before + 2, ("the detailer pass is an AutoLoRA generation of its own", st)
    assert st["active"] and st["finished"] and st["failure"] is None, st
    assert st["guided_steps"] >= int(AD_DENOISE * STEPS) and st["base_calls"] >= st["guided_steps"], st
    assert_differs(on.image[FACE], off.image[FACE], "γ 1.5 in the detailer pass vs without AutoLoRA")
    assert diff(on.image[FAR], off.image[FAR])[0] < 0.5, "far from the face nothing changes"
    assert "AutoLoRA: True" in on.infotext and "ADetailer model: mediapipe_face_full" in on.infotext, on.infotext
    assert "AutoLoRA ADetailer: guided" in on.infotext, ("the image says its detailer pass was guided", on.infotext)
    # the API's info carries the outer params as JSON (Forge Classic serialises them without a fallback)
    assert on.info["extra_generation_params"].get("AutoLoRA ADetailer") == "guided", on.info["extra_generation_params"]

    g1 = webui.img2img(ad_req(webui, face_png, {"enabled": True, "gamma": 1.0}))
    assert_close(g1.image, off.image, "detailer pass at γ 1 vs without AutoLoRA")
    assert g1.stats["generation"] == st["generation"] + 2 and g1.stats["guided_steps"] >= int(AD_DENOISE * STEPS)
    without = webui.img2img(ad_req(webui, face_png, {"enabled": False}, lora=False))
    assert_differs(without.image[FACE], off.image[FACE], "the LoRA must change the detailer pass")
    g0 = webui.img2img(ad_req(webui, face_png, {"enabled": True, "gamma": 0.0}))
    assert_close(g0.image, without.image, "detailer pass at γ 0 vs the prompt without the LoRA")


def test_a_job_of_two_batches_stays_one_autolora_generation_through_its_detailer_passes(webui, face_png):
    """ADetailer runs its pass after each batch's image, inside the job: the job's AutoLoRA
    generation waits through each pass and binds again for its next batch, whose step it guides.
    γ 1 keeps each detailer pass the one without AutoLoRA; each image names its guided pass."""
    webui.set_options({"ad_script_names": AD_SCRIPT_DEFAULT + ",autolora"})
    off = webui.img2img(dict(ad_req(webui, face_png, {"enabled": False}), n_iter=2))
    before = webui.stats().get("generation", 0)
    on = webui.img2img(dict(ad_req(webui, face_png, {"enabled": True, "gamma": 1.0}), n_iter=2))
    assert on.stats["generation"] == before + 3, ("the job's generation and one per detailer pass", on.stats)
    assert on.stats["finished"] and on.stats["failure"] is None, on.stats
    images, infotexts = on.images[-2:], on.info["infotexts"][-2:]  # after the grid, where the host returns one
    for image, want, infotext in zip(images, off.images[-2:], infotexts):
        assert_close(image, want, "detailer pass at γ 1 vs without AutoLoRA")
        assert "AutoLoRA: True" in infotext, ("each batch of the job guided", infotext)
        assert "AutoLoRA ADetailer: guided" in infotext, infotext
