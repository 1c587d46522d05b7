"""SD3 (an MMDiT with fused q/k/v, two CLIP text encoders, a flow-matching sampler): a tiny random
SD3 in the real key layout (depth 2, real CLIP-L/G and VAE shapes; ../shared/webui/SD3.md) and a
diffusers-format SD3 LoRA on the x-stream attention, 64x64, 4 steps. Every identity first with the
WebUI's default inputs, then with a negative prompt and Euler."""
from __future__ import annotations

import numpy as np

from webui import assert_close, assert_differs, assert_drawn, diff, png_b64, with_autolora

ARCH = "sd3"
STEPS = 4
DEFAULTS, VARIATION = "WebUI defaults", "negative prompt, Euler"


def req(webui, variant=DEFAULTS, lora=True, **kw):
    out = {"prompt": "a photo of a cat" + (f" <lora:{webui.models['lora'].stem}:1>" if lora else ""),
           "steps": STEPS, "width": 64, "height": 64, "cfg_scale": 7, "seed": 4242}
    spec = webui.host.spec.archs[ARCH]
    out.update(spec.ui_defaults if variant == DEFAULTS else
               {"negative_prompt": "blurry", "sampler_name": "Euler", "cfg_scale": 5, **spec.variation})
    out.update(kw)
    return out



def test_sd3_identities_with_the_base_branch_counted(webui):
    for v in (DEFAULTS, VARIATION):
        plain, lora = webui.txt2img(req(webui, v, lora=False)), webui.txt2img(req(webui, v))
        assert_drawn(plain.image, f"{v}: plain image")
        assert_differs(plain.image, lora.image, f"{v}: the SD3 LoRA must change the image")
        g1 = webui.txt2img(with_autolora(req(webui, v), {"enabled": True, "gamma": 1.0}))
        assert_close(g1.image, lora.image, f"{v}: SD3 γ=1, w2=CFG vs plain LoRA")
        st = g1.stats
        assert st["active"] and st["guided_steps"] >= STEPS and st["base_calls"] >= STEPS, st
        assert st["modules"]["unet"] > 0 and not st["notices"], st
        assert "AutoLoRA gamma: 1" in g1.infotext
        g0 = webui.txt2img(with_autolora(req(webui, v), {"enabled": True, "gamma": 0.0}))
        assert_close(g0.image, plain.image, f"{v}: SD3 γ=0, w1=CFG vs no LoRA")
        a = webui.txt2img(with_autolora(req(webui, v), {"enabled": True}))
        b = webui.txt2img(with_autolora(req(webui, v), {"enabled": True}))
        assert_differs(a.image, lora.image, f"{v}: SD3 γ=1.5 vs plain LoRA")
        assert a.pngs[0] == b.pngs[0], f"{v}: same seed, same settings: byte-identical PNG"
        off = webui.txt2img(with_autolora(req(webui, v), {"enabled": False, "gamma": 3.0}))
        assert off.pngs[0] == lora.pngs[0], f"{v}: disabled = the WebUI alone"


def test_sd3_two_samplers_and_every_strategy(webui):
    euler_schedule = webui.host.spec.archs[ARCH].variation.get("scheduler", "Automatic")
    for sampler, scheduler in (("Euler", euler_schedule), ("DPM++ 2M", "Automatic")):
        kw = {"sampler_name": sampler, "scheduler": scheduler}
        plain = webui.txt2img(req(webui, **kw))
        assert_drawn(plain.image, f"{sampler} {scheduler}")
        out = webui.txt2img(with_autolora(req(webui, **kw), {"enabled": True, "gamma": 1.0}))
        assert_close(out.image, plain.image, f"SD3 {sampler}: γ=1 vs plain LoRA")
        assert out.stats["guided_steps"] >= STEPS, out.stats
    ref = webui.txt2img(with_autolora(req(webui), {"enabled": True, "strategy": "batched"}))
    for name in ("dual", "sequential", "swap"):
        out = webui.txt2img(with_autolora(req(webui), {"enabled": True, "strategy": name}))
        assert out.stats["strategy"] == name, out.stats
        assert_close(out.image, ref.image, f"SD3 strategy {name} vs batched")


def test_sd3_img2img(webui):
    init = png_b64(webui.txt2img(req(webui, lora=False)).image)
    common = dict(init_images=[init], denoising_strength=0.7)
    webui.img2img(req(webui, lora=False, **common))  # warm-up (see test_sd15.test_img2img_via_webuiapi)
    plain = webui.img2img(req(webui, lora=False, **common))
    lora = webui.img2img(req(webui, **common))
    g0 = webui.img2img(with_autolora(req(webui, **common), {"enabled": True, "gamma": 0.0}))
    g1 = webui.img2img(with_autolora(req(webui, **common), {"enabled": True, "gamma": 1.0}))
    assert_close(g0.image, plain.image, "SD3 img2img: γ=0 vs no LoRA")
    assert_close(g1.image, lora.image, "SD3 img2img: γ=1 vs plain LoRA")


def test_sd3_leaves_nothing_behind(webui):
    before = webui.get("/autolora/v1/residue")
    plain = webui.txt2img(req(webui, lora=False))
    lora = webui.txt2img(req(webui))
    for _ in range(2):
        webui.txt2img(with_autolora(req(webui), {"enabled": True}))
    assert webui.txt2img(req(webui, lora=False)).pngs[0] == plain.pngs[0]
    assert webui.txt2img(req(webui)).pngs[0] == lora.pngs[0]
    after = webui.get("/autolora/v1/residue")
    assert after["module_hooks"] == before["module_hooks"] == 0 and after["open_runs"] == 0, after
    assert after["callbacks_total"] == before["callbacks_total"]
    # live tensors: what two more AutoLoRA generations leave must not grow with them
    assert after["tensor_bytes"] - before["tensor_bytes"] < 32 * 2 ** 20, (before["tensor_bytes"], after["tensor_bytes"])
    assert np.isfinite(lora.image).all() and diff(lora.image, plain.image)[0] > 1
