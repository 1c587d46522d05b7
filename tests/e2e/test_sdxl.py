"""SDXL (two text encoders, OpenCLIP MultiheadAttention layers, the `vector` conditioning), kept
small: 64x64, 3 steps, through the `webuiapi` client as users call it. Runs only with the machine
to itself (a 24 GB machine holds one SDXL WebUI; A1111 needs lora_functional for an SDXL LoRA)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from webui import assert_close, assert_differs

ARCH = "sdxl"
STEPS = 3


@pytest.fixture(scope="module")
def api(webui):
    import webuiapi  # the PyPI client users call the API with (tests/e2e/requirements.txt)
    return webuiapi.WebUIApi(baseurl=webui.url + "/sdapi/v1")


def gen(api, webui, variant, lora: bool, args=None):
    prompt = "a photo of a cat" + (f" <lora:{webui.models['lora'].stem}:1>" if lora else "")
    request = dict(webui.host.spec.archs[ARCH].ui_defaults) if variant == "WebUI defaults" else \
        {"negative_prompt": "blurry", "sampler_name": "Euler a", "cfg_scale": 7}
    result = api.txt2img(prompt=prompt, steps=STEPS, width=64, height=64, seed=4242,
                         alwayson_scripts={"AutoLoRA": {"args": [args]}} if args else {}, **request)
    return np.asarray(result.image).astype(np.int16), result, webui.stats()


@pytest.mark.parametrize("variant", ["WebUI defaults", "negative prompt, Euler a"])
def test_sdxl_identities_determinism_and_no_leak(api, webui, variant):
    plain, plain_res, _ = gen(api, webui, variant, lora=False)
    lora, _, _ = gen(api, webui, variant, lora=True)
    assert_differs(plain, lora, "SDXL LoRA must change the image")

    g1, res, st = gen(api, webui, variant, True, {"enabled": True, "gamma": 1.0})
    assert_close(g1, lora, "SDXL γ=1 vs plain LoRA")
    assert st["active"] and st["guided_steps"] >= STEPS and st["base_calls"] >= STEPS, st
    # both text encoders: CLIP-L Linear layers and OpenCLIP's MultiheadAttention + MLP layers
    assert st["modules"]["text_encoder"] > 72, st

    g0, _, _ = gen(api, webui, variant, True, {"enabled": True, "gamma": 0.0})
    assert_close(g0, plain, "SDXL γ=0 vs no LoRA (UNet and both text encoders LoRA-free)")

    a, res_a, _ = gen(api, webui, variant, True, {"enabled": True})
    b, res_b, _ = gen(api, webui, variant, True, {"enabled": True})
    assert_differs(a, lora, "SDXL γ=1.5 vs plain LoRA")
    assert_differs(a, plain, "SDXL γ=1.5 vs no LoRA")
    assert (a == b).all(), "two identical requests gave different images"
    # The infotext names the strategy that ran, and `auto` picks it by the free memory of the moment
    # (all strategies give the same image): every other field must match.
    ran = [re.findall(r"AutoLoRA strategy: (\w+)", r.info["infotexts"][0]) for r in (res_a, res_b)]
    assert all(len(r) == 1 and r[0] in ("batched", "dual", "swap", "sequential") for r in ran), ran
    texts = [re.sub(r"AutoLoRA strategy: \w+", "AutoLoRA strategy: (ran)", r.info["infotexts"][0]) for r in (res_a, res_b)]
    differ = sorted(set(texts[0].split(", ")) ^ set(texts[1].split(", ")))
    assert texts[0] == texts[1], f"two identical requests' infotexts differ: {differ}"

    again, _, _ = gen(api, webui, variant, lora=False)
    assert (again == plain).all(), "plain SDXL image unchanged after AutoLoRA"
