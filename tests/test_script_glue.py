"""The WebUI glue, hermetic: API validation (and its ASGI middleware), settings with X/Y/Z overrides,
the script's UI/infotext/paste derived from the parameter table, the Lora-extension factor reader,
and the per-step CFG-denoiser binding driven by a stand-in that copies A1111's call order
(tests/a1111_standins.py). The real WebUIs are exercised by tests/e2e.
"""
from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import os
from types import SimpleNamespace

import pytest
import torch

import a1111_standins as sti
from helpers import lora_state_dict, make_model, merged_copy
from lib_autolora import params
from lib_autolora.base_branch import DeltaHooks, make_strategy
from lib_autolora.guidance import GuidanceInterval
from lib_autolora.hosts import common
from lib_autolora.kohya import factors_from_kohya
from lib_autolora.params import AutoLoraArgumentError, AutoLoraSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- prompts and API validation ---------------------------------------------------------------------

def test_lora_tags_in_prompts():
    assert common.lora_names_in_prompt("a <lora:style_a:0.8> b <LORA:Other:te=1:unet=0.5>", ["<lora:x>", None],
                                       "<lyco:y:1> <lora:style_a>") == ["style_a", "Other", "x", "y"]


def test_select_guided_by_any_name_and_clear_error():
    loaded = [("k1", "style", "style", "style_file", "Style Alias"), ("k2", "other", None, "other", "other")]
    assert common.select_guided(loaded, ()) == ["k1", "k2"]
    assert common.select_guided(loaded, ("style alias",)) == ["k1"]
    with pytest.raises(AutoLoraArgumentError, match="'nope' not in the prompt; the prompt's LoRAs: style, other"):
        common.select_guided(loaded, ("nope",))


REQ = {"prompt": "a cat <lora:style:1>", "steps": 4}


@pytest.mark.parametrize("entry,message", [
    ({"args": [{"enabled": True, "gama": 1}]}, "unknown argument"),
    ({"args": [True, float("nan")]}, "finite"),
    ({"args": [True, 1.5, -2]}, "'w1' must be >= 0"),
    ({"args": [True] * 11}, "at most 10"),
    ({"args": [{"enabled": True, "guided_loras": "other"}]}, "'other' not in the prompt"),
    ({"args": "yes"}, "must be a list"),
    ({"args": [True, {"gamma": 2}]}, "first slot"),
    ({"arg": [True]}, "takes only \"args\""),
    ([True], "must be an object"),
])
def test_validate_request_messages(entry, message):
    error, _ = common.validate_request(dict(REQ, alwayson_scripts={"autolora": entry}))
    assert error is not None and message in error


def test_validate_request_accepts_and_rewrites_single_dict():
    assert common.validate_request(dict(REQ)) == (None, None)
    assert common.validate_request(dict(REQ, alwayson_scripts={"AutoLoRA": {"args": [True, 2.0]}})) == (None, None)
    error, body = common.validate_request(dict(REQ, alwayson_scripts={"AutoLoRA": {"args": {"enabled": True}}}))
    assert error is None and body["alwayson_scripts"]["AutoLoRA"]["args"] == [{"enabled": True}]
    # styles can add LoRAs: their names are checked when the batch starts instead
    assert common.validate_request(dict(REQ, styles=["s"], alwayson_scripts={"AutoLoRA": {"args": [
        {"enabled": True, "guided_loras": "from_style"}]}})) == (None, None)


def _asgi(middleware, path, body: bytes):
    """Drive an ASGI app the way uvicorn does; returns (status, body, what the inner app received)."""
    sent, inner = [], {}
    messages = [{"type": "http.request", "body": body[:5], "more_body": True},
                {"type": "http.request", "body": body[5:], "more_body": False}]

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    async def app(scope, receive_, send_):
        chunks, more = [], True
        while more:
            message = await receive_()
            chunks.append(message["body"])
            more = message.get("more_body", False)
        inner["body"] = b"".join(chunks)
        inner["headers"] = dict(scope["headers"])
        await send_({"type": "http.response.start", "status": 200, "headers": []})
        await send_({"type": "http.response.body", "body": b"ok"})

    scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-length", str(len(body)).encode())]}
    asyncio.run(common.ApiValidationMiddleware(app)(scope, receive, send))
    return sent[0]["status"], sent[1]["body"], inner


def test_middleware_rejects_rewrites_and_passes_through():
    bad = json.dumps(dict(REQ, alwayson_scripts={"AutoLoRA": {"args": [True, "x"]}})).encode()
    status, body, inner = _asgi(None, "/sdapi/v1/txt2img", bad)
    assert status == 422 and "'gamma' must be a number" in json.loads(body)["detail"] and not inner
    single = json.dumps(dict(REQ, alwayson_scripts={"AutoLoRA": {"args": {"enabled": True}}})).encode()
    status, _, inner = _asgi(None, "/sdapi/v1/img2img", single)
    assert status == 200 and json.loads(inner["body"])["alwayson_scripts"]["AutoLoRA"]["args"] == [{"enabled": True}]
    assert inner["headers"][b"content-length"] == str(len(inner["body"])).encode()
    status, _, inner = _asgi(None, "/sdapi/v1/options", bad)  # other endpoints untouched
    assert status == 200 and inner["body"] == bad


# -- settings, X/Y/Z --------------------------------------------------------------------------------

class StandInAxisOption:
    """scripts/xyz_grid.py AxisOption(label, type, apply, format_value=..., confirm=None, cost=0.0,
    choices=None, prepare=None)."""

    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.confirm, self.choices = label, type, apply, confirm, choices


def standin_xyz_module():
    return SimpleNamespace(AxisOption=StandInAxisOption, axis_options=[StandInAxisOption("Nothing", str, None)],
                           boolean_choice=lambda reverse=False: (lambda: ["False", "True"] if reverse else ["True", "False"]))


def test_xyz_axes_from_the_table_and_cells_independent():
    xyz = standin_xyz_module()
    assert common.add_xyz_axes(xyz) == len(params.XYZ_PARAMS)
    assert common.add_xyz_axes(xyz) == 0  # idempotent (import time and on_before_ui)
    labels = [o.label for o in xyz.axis_options]
    assert "[AutoLoRA] γ (AutoLoRA scale)" in labels and "[AutoLoRA] Enabled" in labels
    gamma = next(o for o in xyz.axis_options if o.label == "[AutoLoRA] γ (AutoLoRA scale)")
    # What xyz_grid.run does: type() each value, confirm the list, apply each to a copy of p.
    xs = [gamma.type(v) for v in ("1", "2.5")]
    gamma.confirm(None, xs)
    p = SimpleNamespace()
    cells = []
    for x in xs:
        pc = copy.copy(p)
        gamma.apply(pc, x, xs)
        cells.append(common.settings_for(pc, [True]))
    assert [c.gamma for c in cells] == [1.0, 2.5] and not hasattr(p, common.OVERRIDES_ATTR)
    enabled = next(o for o in xyz.axis_options if o.label == "[AutoLoRA] Enabled")
    assert enabled.choices() == ["False", "True"]
    pc = copy.copy(p)
    enabled.apply(pc, "True", ["True"])
    assert common.settings_for(pc, [False]).enabled
    start = next(o for o in xyz.axis_options if o.label == "[AutoLoRA] Guidance start")
    with pytest.raises(AutoLoraArgumentError, match="'start' is a fraction"):
        start.confirm(None, [0.2, 1.5])
    pc = copy.copy(p)
    start.apply(pc, 0.9, [0.9])
    with pytest.raises(AutoLoraArgumentError, match="must not exceed"):
        common.settings_for(pc, [True, 1.5, -1, -1, 1, 0, 0.5])


def test_mark_active_writes_infotext_and_inactive_removes_it():
    p = SimpleNamespace(extra_generation_params={"Steps": 4})
    settings = AutoLoraSettings(enabled=True, gamma=2.0, guided_loras=("a", "b"))
    common.mark_active(p, settings)
    assert p.extra_generation_params["AutoLoRA gamma"] == "2" and p.extra_generation_params["AutoLoRA guided"] == "a, b"
    common.mark_inactive(p)
    assert p.extra_generation_params == {"Steps": 4}


# -- the AlwaysOn script ----------------------------------------------------------------------------

def _load_script():
    spec = importlib.util.spec_from_file_location("autolora_script_under_test", os.path.join(ROOT, "scripts", "autolora.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_ui_follows_the_table_and_paste_restores_every_control():
    with sti.installed() as host:
        script_module = _load_script()
        script = script_module.AutoLoraScript()
        assert script.title() == "AutoLoRA" and script.show(False) is host.scripts.AlwaysVisible
        controls = script.ui(False)
        assert [c.elem_id for c in controls] == [f"autolora_txt2img_{n}" for n in params.ARG_ORDER]
        assert isinstance(controls[0], sti.StandInInputAccordion) and controls[0].value is False
        assert [c.label for c in controls] == [p.label for p in params.PARAMS]
        gamma = controls[1]
        assert (gamma.minimum, gamma.maximum, gamma.value) == (-2.0, 5.0, 1.5) and isinstance(gamma.value, float)
        # The defaults the API fills in (init_default_script_args reads each control's value) parse to off.
        assert params.settings_from_args([c.value for c in controls]) == AutoLoraSettings()
        # Infotext of an enabled run -> the paste functions -> the same settings.
        s = AutoLoraSettings(True, 1.2, 5.0, None, 0.8, 0.25, 0.75, ("style",), "sequential", False)
        infotext = params.infotext_fields(s)
        pasted = [fn(infotext) for _, fn in script.infotext_fields]
        assert params.settings_from_args(pasted) == s
        assert script.paste_field_names == [p.infotext for p in params.PARAMS]
        assert [c.elem_id for c in script.ui(True)][0] == "autolora_img2img_enabled"
        # Settings page and callbacks registered at import time
        script_module.on_ui_settings()
        assert host.shared.opts.autolora_default_strategy == "auto" and host.shared.opts.autolora_swap_budget_mb == 0
        assert script_module.on_app_started in host.callbacks.lists["app_started"]
        assert host.callbacks.lists["cfg_denoiser"] and host.callbacks.lists["cfg_denoised"]


class StandInAdapter:
    def __init__(self, notice=None, error=None):
        self.calls, self.notice, self.error = [], notice, error

    def start_batch(self, p, settings):
        self.calls.append(("start_batch", settings))
        if self.error:
            raise self.error
        return self.notice

    def before_sampling(self, p, **kw):
        self.calls.append(("before_sampling", sorted(kw)))

    def finish(self, p):
        self.calls.append(("finish",))


def _p(**kw):
    comments = []
    return SimpleNamespace(comments=comments, comment=comments.append, extra_generation_params={}, **kw)


def test_script_call_order_and_bad_ui_values():
    with sti.installed():
        module = _load_script()
        script = module.AutoLoraScript()
        module.ADAPTER = adapter = StandInAdapter(notice="AutoLoRA: note")
        p = _p()
        # processing.process_images_inner: process -> (per batch) process_batch -> process_before_every_sampling
        # -> postprocess
        script.process(p, True, 2.0)
        script.process_batch(p, True, 2.0, batch_number=0, prompts=["x"], seeds=[1], subseeds=[1])
        script.process_before_every_sampling(p, True, 2.0, x=1, noise=2, c=3, uc=4)
        script.postprocess(p, None, True, 2.0)
        assert [c[0] for c in adapter.calls] == ["finish", "start_batch", "before_sampling", "finish"]
        assert adapter.calls[1][1].gamma == 2.0 and adapter.calls[2][1] == ["c", "noise", "uc", "x"]
        assert p.comments == ["AutoLoRA: note"]
        # disabled: the adapter is never asked to start
        adapter.calls.clear()
        q = _p()
        script.process(q, False, 2.0)
        script.process_batch(q, False, 2.0)
        script.process_before_every_sampling(q, False, 2.0, c=1, uc=2)
        assert [c[0] for c in adapter.calls] == ["finish"]
        # invalid UI values: logged, a notice, AutoLoRA off
        r = _p()
        script.process(r, True, float("nan"))
        script.process_batch(r, True, float("nan"))
        assert "must be finite" in r.comments[0] and not any(c[0] == "start_batch" for c in adapter.calls[1:])
        # an adapter error: notice, AutoLoRA off, infotext cleaned
        module.ADAPTER = StandInAdapter(error=AutoLoraArgumentError("AutoLoRA: guided LoRA(s) 'x' not in the prompt"))
        s = _p()
        script.process(s, True)
        s.extra_generation_params["AutoLoRA gamma"] = "1.5"
        script.process_batch(s, True)
        assert "not in the prompt" in s.comments[0] and "AutoLoRA gamma" not in s.extra_generation_params


# -- the Lora extension's networks -> factors -------------------------------------------------------

class StandInNetwork:
    """extensions-builtin/Lora/network.py Network: name, multipliers, dyn_dim, modules."""

    def __init__(self, name, te=1.0, unet=1.0, dyn_dim=None):
        self.name, self.te_multiplier, self.unet_multiplier, self.dyn_dim = name, te, unet, dyn_dim
        self.modules = {}
        self.network_on_disk = SimpleNamespace(name=name, alias=name, filename=f"/loras/{name}.safetensors")
        self.mentioned_name = name


class StandInNetworkModuleLora:
    """network_lora.NetworkModuleLora: up/down/mid models, alpha/dim scale, the TE/UNet multiplier
    rule, calc_updown (merged mode: rebuild_conventional with dyn_dim, or the cp decomposition) and
    forward (lora_functional: y + up(down(x)) * multiplier * scale)."""

    def __init__(self, net, sd_key, sd_module, up, down, alpha, mid=None):
        self.network, self.sd_key, self.sd_module, self.network_key = net, sd_key, sd_module, sd_key
        self.up_model = SimpleNamespace(weight=up)
        self.down_model = SimpleNamespace(weight=down)
        self.mid_model = None if mid is None else SimpleNamespace(weight=mid)
        self.alpha, self.dim, self.scale, self.bias, self.dora_scale = alpha, down.shape[0], None, None, None

    def multiplier(self):
        return self.network.te_multiplier if 'transformer' in self.sd_key[:20] else self.network.unet_multiplier

    def calc_scale(self):
        return self.alpha / self.dim

    def calc_updown(self, orig_weight):
        up, down = self.up_model.weight, self.down_model.weight
        if self.mid_model is not None:
            updown = torch.einsum('n m k l, i n, m j -> i j k l', self.mid_model.weight, up.reshape(up.size(0), -1),
                                  down.reshape(down.size(0), -1))
        else:
            u, d = up.reshape(up.size(0), -1), down.reshape(down.size(0), -1)
            if self.network.dyn_dim is not None:
                u, d = u[:, :self.network.dyn_dim], d[:self.network.dyn_dim, :]
            updown = u @ d
        return updown.reshape(orig_weight.shape) * self.calc_scale() * self.multiplier(), None

    def forward(self, x, y):
        sd = self.sd_module
        if isinstance(sd, torch.nn.Conv2d):
            h = torch.nn.functional.conv2d(x, self.down_model.weight, stride=sd.stride, padding=sd.padding)
            return y + torch.nn.functional.conv2d(h, self.up_model.weight) * self.multiplier() * self.calc_scale()
        return y + (x @ self.down_model.weight.T @ self.up_model.weight.T) * self.multiplier() * self.calc_scale()


def _networks_on(model, name, seed, te=1.0, unet=1.0, dyn_dim=None, mid=False):
    net = StandInNetwork(name, te, unet, dyn_dim)
    sd = lora_state_dict(model, seed=seed, tucker_mid=mid)
    modules = model.kohya_modules()
    for key in {k.split(".")[0] for k in sd}:
        path, module = modules[key]
        sd_key = ("transformer_" if key.startswith("lora_te") else "diffusion_model_") + path.replace(".", "_")
        net.modules[key] = StandInNetworkModuleLora(net, sd_key, module, sd[f"{key}.lora_up.weight"],
                                                    sd[f"{key}.lora_down.weight"], float(sd[f"{key}.alpha"]),
                                                    sd.get(f"{key}.lora_mid.weight"))
    return net


@pytest.mark.parametrize("merged", [True, False])
@pytest.mark.parametrize("variant", ["plain", "dyn_dim", "mid", "strengths"])
def test_factors_equal_what_the_host_adds(merged, variant):
    from lib_autolora.hosts import a1111
    if variant == "mid" and not merged:
        pytest.skip("A1111's functional forward does not apply the mid; covered by the skip test")
    model = make_model(0)
    net = _networks_on(model, "a", 1, te=0.7 if variant == "strengths" else 1.0, unet=1.3 if variant == "strengths" else 1.0,
                       dyn_dim=2 if variant == "dyn_dim" else None, mid=variant == "mid")
    factors = a1111.read_factors([net], [net], weights_merged=merged)
    assert not factors.skipped and len(factors.te.nonzero()) > 0 and len(factors.unet.nonzero()) > 0
    g = torch.Generator().manual_seed(3)
    for nm in net.modules.values():
        sd = nm.sd_module
        delta = (factors.te if "transformer" in nm.sd_key[:20] else factors.unet).deltas[sd]
        x = torch.randn((2, sd.in_channels, 8, 8) if isinstance(sd, torch.nn.Conv2d) else (2, sd.in_features), generator=g)
        base = sd(x)
        if merged:  # the host adds calc_updown(W) to the weight
            w = sd.weight + nm.calc_updown(sd.weight)[0]
            host = sd._conv_forward(x, w, sd.bias) if isinstance(sd, torch.nn.Conv2d) else torch.nn.functional.linear(x, w, sd.bias)
        else:
            host = nm.forward(x, base)
        torch.testing.assert_close(base + delta.forward(x), host, atol=1e-5, rtol=1e-4)


def test_factors_guided_subset_skips_and_mha():
    from lib_autolora.hosts import a1111
    model = make_model(0)
    a, b = _networks_on(model, "a", 1), _networks_on(model, "b", 2)
    factors = a1111.read_factors([a, b], [a], weights_merged=True)
    some = next(iter(a.modules.values())).sd_module
    assert all(t.source.endswith("a.safetensors") for d in factors.unet.deltas.values() for t in d.terms)
    assert some not in factors.exact_backup  # b touches it too: the backup is not its base
    assert a1111.read_factors([a], [a], weights_merged=True).exact_backup >= {some}
    # LoRA on a GroupNorm / functional Tucker: named, kept in both branches
    norm = StandInNetwork("n")
    nm = StandInNetworkModuleLora(norm, "diffusion_model_norm", torch.nn.GroupNorm(2, 4), torch.zeros(4, 1), torch.zeros(1, 4), 1.0)
    norm.modules["k"] = nm
    f = a1111.read_factors([norm], [norm], weights_merged=True)
    assert f.skipped == [("n", "k", "LoRA on a GroupNorm layer")]
    mid = _networks_on(model, "m", 3, mid=True)
    f = a1111.read_factors([mid], [mid], weights_merged=False)
    assert any("Tucker" in reason for _, _, reason in f.skipped)
    # OpenCLIP: q/k/v/out of one MultiheadAttention (q/k/v map to the MHA, out to its out_proj Linear)
    mha = torch.nn.MultiheadAttention(8, 2)
    net = StandInNetwork("x")
    for part in ("q", "k", "v"):
        net.modules[f"te2_{part}"] = StandInNetworkModuleLora(net, f"1_model_transformer_resblocks_0_attn_{part}_proj", mha,
                                                             torch.randn(8, 2), torch.randn(2, 8), 2.0)
    net.modules["te2_out"] = StandInNetworkModuleLora(net, "1_model_transformer_resblocks_0_attn_out_proj", mha.out_proj,
                                                     torch.randn(8, 2), torch.randn(2, 8), 2.0)
    f = a1111.read_factors([net], [net], True, {"1_model_transformer_resblocks_0_attn": mha})
    assert set(f.mha) == {mha} and {p.part for p in f.mha[mha]} == {"q", "k", "v", "out"} and not f.te.deltas
    # MhaSwap: base weights = merged - the guided updowns; put back by reference after the call
    w_in, w_out = mha.in_proj_weight.detach().clone(), mha.out_proj.weight.detach().clone()
    with torch.no_grad():  # what the host's MHA merge does
        for part, sl in (("q", slice(0, 8)), ("k", slice(8, 16)), ("v", slice(16, 24))):
            mha.in_proj_weight[sl] += net.modules[f"te2_{part}"].calc_updown(mha.in_proj_weight[sl])[0]
        mha.out_proj.weight += net.modules["te2_out"].calc_updown(mha.out_proj.weight)[0]
    merged_in = mha._parameters["in_proj_weight"]
    with a1111.MhaSwap(f).swapped(-1.0):
        torch.testing.assert_close(mha.in_proj_weight, w_in, atol=1e-5, rtol=0)
        torch.testing.assert_close(mha.out_proj.weight, w_out, atol=1e-5, rtol=0)
    assert mha._parameters["in_proj_weight"] is merged_in


# -- per step: the CFG denoiser binding -------------------------------------------------------------

def _cond(te, classes, weights=None):
    """A StandInMulticond of one prompt per image; `weights` adds AND sub-prompts."""
    ctx = te(torch.tensor(classes))
    if weights is None:
        return sti.StandInMulticond([[(ctx[i], 1.0)] for i in range(len(classes))])
    other = te(torch.tensor([(c + 3) % 10 for c in classes]))
    return sti.StandInMulticond([[(ctx[i], 1.0), (other[i], weights)] for i in range(len(classes))])


def _long(uncond_list):
    """Uncond of 8 tokens (two prompts' worth) to make cond/uncond lengths differ."""
    return [torch.cat([u, u.flip(0)]) for u in uncond_list]


def _sample(host, model_denoiser, c, uc, run=None, steps=4, s_min_uncond=0.0):
    """A k-diffusion Euler loop over the stand-in CFGDenoiser (what sd_samplers_kdiffusion does)."""
    from lib_autolora.hosts import a1111
    p = SimpleNamespace(comment=lambda text: None, **{a1111.RUN_ATTR: run})
    sampler = SimpleNamespace(sampler_extra_args={"cond": c, "uncond": uc})
    wraps = []

    def factory():
        wraps.append(sti.StandInModelWrap(model_denoiser))
        return wraps[-1]

    denoiser = sti.StandInCFGDenoiser(sampler, p, factory, host.shared, host.callbacks)
    denoiser.steps, denoiser.total_steps = steps, steps
    n = len(c.batch)
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 3.0
    sigmas = torch.linspace(3.0, 0.0, steps + 1)
    for i in range(steps):
        sigma = torch.full((n,), float(sigmas[i]))
        denoised = denoiser(x, sigma, uc, c, 5.0, s_min_uncond, torch.zeros(n, 1, 1, 1))
        assert denoiser._modules["model_wrap"] is wraps[0] and "combine_denoised" not in denoiser.__dict__
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x, wraps[0].calls


LAYOUTS = {
    "batched": dict(),
    "chunked": dict(batch_cond_uncond=False),
    "ngms": dict(s_min_uncond=10.0),
    "skip_early_cfg": dict(skip_early_cond=0.3),
    "pad": dict(pad_cond_uncond=True, long_uncond=True),
    "pad_v0": dict(pad_cond_uncond_v0=True, long_uncond=True),
    "unequal": dict(long_uncond=True),
    "and_prompt": dict(and_weight=0.6),
}


@pytest.mark.parametrize("layout,strategy", [(name, "batched") for name in sorted(LAYOUTS)] +
                         [("chunked", "sequential"), ("ngms", "sequential")] +
                         [(name, "dual") for name in ("batched", "ngms", "pad", "unequal", "and_prompt")])
def test_cfg_denoiser_identities_in_every_layout(layout, strategy):
    from lib_autolora.hosts import a1111
    cfg = dict(LAYOUTS[layout])
    s_min_uncond = cfg.pop("s_min_uncond", 0.0)
    long_uncond = cfg.pop("long_uncond", False)
    and_weight = cfg.pop("and_weight", None)
    clean = make_model(0)
    lora_sd = lora_state_dict(clean, seed=1)
    merged = merged_copy(0, [(lora_sd, 1.0)])
    factors = factors_from_kohya(lora_sd, merged.kohya_modules())
    te_modules = set(merged.text_encoder.modules())
    unet_factors = factors.only([m for m in factors.deltas if m not in te_modules])
    sd_model = SimpleNamespace(sd_checkpoint_info=SimpleNamespace(filename="x", title="x"),
                               cond_stage_model_empty_prompt=merged.text_encoder(torch.tensor([10])))
    with sti.installed(sti.standin_opts(**cfg), sd_model) as host:
        host.callbacks.on_cfg_denoiser(a1111.on_cfg_denoiser)
        host.callbacks.on_cfg_denoised(a1111.on_cfg_denoised)

        def conds(te):
            c = _cond(te, [2, 7], and_weight)
            uc = [t for t in te(torch.tensor([10, 10]))]
            return c, (_long(uc) if long_uncond else uc)

        lora_c, lora_uc = conds(merged.text_encoder)
        base_c, base_uc = conds(clean.text_encoder)
        host_lora, calls = _sample(host, merged.denoiser, lora_c, lora_uc, s_min_uncond=s_min_uncond)
        host_base, _ = _sample(host, clean.denoiser, base_c, base_uc, s_min_uncond=s_min_uncond)
        assert (host_lora - host_base).abs().max() > 1e-2
        for gamma, want in ((1.0, host_lora), (0.0, host_base)):
            settings = AutoLoraSettings(enabled=True, gamma=gamma)
            run = a1111.Run(settings, common.DIAGNOSTICS.begin("standin", settings), GuidanceInterval(),
                            checkpoint=a1111.checkpoint_key(sd_model))
            run.strategy = make_strategy(strategy, unet_factors).__enter__()
            run.pairs[id(lora_c)] = (lora_c, a1111.CondPair(base=(base_c, base_uc)))
            got, got_calls = _sample(host, merged.denoiser, lora_c, lora_uc, run, s_min_uncond=s_min_uncond)
            run.close()
            assert not run.notices, run.notices
            assert run.record["guided_steps"] == 4 and run.base_calls_done >= 4
            torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
        if layout in ("chunked", "unequal"):
            assert len(calls) > 4, "the layout must split the model calls"


def test_cfg_denoiser_interval_explicit_w_and_errors():
    from lib_autolora.hosts import a1111
    clean = make_model(0)
    lora_sd = lora_state_dict(clean, seed=1)
    merged = merged_copy(0, [(lora_sd, 1.0)])
    factors = factors_from_kohya(lora_sd, merged.kohya_modules())
    sd_model = SimpleNamespace(sd_checkpoint_info=SimpleNamespace(filename="x", title="x"))
    with sti.installed(sti.standin_opts(), sd_model) as host:
        host.callbacks.on_cfg_denoiser(a1111.on_cfg_denoiser)
        host.callbacks.on_cfg_denoised(a1111.on_cfg_denoised)
        c = _cond(merged.text_encoder, [1])
        uc = [t for t in merged.text_encoder(torch.tensor([10]))]
        plain, _ = _sample(host, merged.denoiser, c, uc)

        def run_with(settings, pair=None, checkpoint=None):
            run = a1111.Run(settings, common.DIAGNOSTICS.begin("standin", settings),
                            GuidanceInterval(settings.start, settings.end),
                            checkpoint=checkpoint or a1111.checkpoint_key(sd_model))
            run.strategy = make_strategy("batched", factors).__enter__()
            run.pairs[id(c)] = (c, pair or a1111.CondPair(base=None))
            out, _ = _sample(host, merged.denoiser, c, uc, run)
            run.close()
            return out, run

        # empty interval: nothing wrapped, exactly the plain run
        out, run = run_with(AutoLoraSettings(enabled=True, start=1.0, end=1.0))
        assert torch.equal(out, plain) and run.record["plain_steps"] == 4 and run.base_calls_done == 0
        out, run = run_with(AutoLoraSettings(enabled=True, start=0.5, end=1.0))
        assert run.record["guided_steps"] == 2 and run.record["plain_steps"] == 2
        # γ=1 with w2 = 5 (= the CFG scale) is the plain run; w2 = 3 is not
        out, _ = run_with(AutoLoraSettings(enabled=True, gamma=1.0, w2=5.0))
        torch.testing.assert_close(out, plain, atol=2e-4, rtol=0)
        out, _ = run_with(AutoLoraSettings(enabled=True, gamma=1.0, w2=3.0))
        assert (out - plain).abs().max() > 1e-3
        # refiner switch (another checkpoint): guidance stops, with a notice
        out, run = run_with(AutoLoraSettings(enabled=True), checkpoint=("other",))
        assert torch.equal(out, plain) and "refiner" in run.notices[0]
        # base conditioning of another shape: a notice, the step runs plain
        bad = a1111.CondPair(base=(_cond(merged.text_encoder, [1, 2]), uc))
        out, run = run_with(AutoLoraSettings(enabled=True), bad)
        assert torch.equal(out, plain) and run.notices


def test_model_exception_mid_step_leaves_the_denoiser_clean():
    from lib_autolora.hosts import a1111
    clean = make_model(0)
    lora_sd = lora_state_dict(clean, seed=1)
    merged = merged_copy(0, [(lora_sd, 1.0)])
    factors = factors_from_kohya(lora_sd, merged.kohya_modules())
    sd_model = SimpleNamespace(sd_checkpoint_info=SimpleNamespace(filename="x", title="x"))
    with sti.installed(sti.standin_opts(), sd_model) as host:
        host.callbacks.on_cfg_denoiser(a1111.on_cfg_denoiser)
        host.callbacks.on_cfg_denoised(a1111.on_cfg_denoised)
        c = _cond(merged.text_encoder, [1])
        uc = [t for t in merged.text_encoder(torch.tensor([10]))]
        settings = AutoLoraSettings(enabled=True)
        run = a1111.Run(settings, common.DIAGNOSTICS.begin("standin", settings), GuidanceInterval(),
                        checkpoint=a1111.checkpoint_key(sd_model))
        run.strategy = make_strategy("batched", factors).__enter__()
        run.pairs[id(c)] = (c, a1111.CondPair(base=None))
        p = SimpleNamespace(comment=lambda text: None, **{a1111.RUN_ATTR: run})
        boom = {"n": 0}

        def failing(x, sigma, ctx):
            boom["n"] += 1
            raise RuntimeError("interrupted")

        real = sti.StandInModelWrap(failing)
        denoiser = sti.StandInCFGDenoiser(SimpleNamespace(sampler_extra_args={"cond": c, "uncond": uc}), p,
                                          lambda: real, host.shared, host.callbacks)
        denoiser.steps = denoiser.total_steps = 4
        with pytest.raises(RuntimeError, match="interrupted"):
            denoiser(torch.zeros(1, 1, 8, 8), torch.ones(1), uc, c, 5.0, 0.0, torch.zeros(1, 1, 1, 1))
        assert isinstance(denoiser._modules["model_wrap"], a1111.StepProxy)  # left by the failed step...
        run.close()  # ...and removed by finish / the next start
        assert denoiser._modules["model_wrap"] is real and "combine_denoised" not in denoiser.__dict__
        assert not run.strategy and all(not m._forward_hooks for m in merged.modules())


def test_base_text_encoding_with_sequence_first_layers_and_mha():
    """OpenCLIP (SDXL's second text encoder) runs its layers on (tokens, batch, dim) tensors and its
    attention is a MultiheadAttention the Lora extension always merges: the base encoding must
    remove the LoRA from both, for any batch size."""
    from lib_autolora.hosts import a1111
    torch.manual_seed(0)

    class TinyOpenClip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2)
            self.c_fc = torch.nn.Linear(8, 8)

        def get_learned_conditioning(self, texts):
            x = torch.stack([torch.full((5, 8), float(len(t))) + torch.arange(8.0) / 8 for t in texts]).permute(1, 0, 2)
            x = x + self.attn(x, x, x, need_weights=False)[0]
            return (x + self.c_fc(x)).permute(1, 0, 2)

    model = TinyOpenClip().eval()
    texts = ["a", "bb", "cccc"]
    clean = model.get_learned_conditioning(texts)
    net = StandInNetwork("xl")
    g = torch.Generator().manual_seed(1)
    for part in ("q", "k", "v"):
        net.modules[part] = StandInNetworkModuleLora(net, f"1_model_transformer_resblocks_0_attn_{part}_proj", model.attn,
                                                    torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g), 2.0)
    net.modules["out"] = StandInNetworkModuleLora(net, "1_model_transformer_resblocks_0_attn_out_proj", model.attn.out_proj,
                                                 torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g), 2.0)
    net.modules["fc"] = StandInNetworkModuleLora(net, "1_model_transformer_resblocks_0_mlp_c_fc", model.c_fc,
                                                torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g), 2.0)
    with torch.no_grad():  # the host's merge (MHA: q/k/v thirds of in_proj, out_proj; Linear: its weight)
        for part, sl in (("q", slice(0, 8)), ("k", slice(8, 16)), ("v", slice(16, 24))):
            model.attn.in_proj_weight[sl] += net.modules[part].calc_updown(model.attn.in_proj_weight[sl])[0]
        model.attn.out_proj.weight += net.modules["out"].calc_updown(model.attn.out_proj.weight)[0]
        model.c_fc.weight += net.modules["fc"].calc_updown(model.c_fc.weight)[0]
    lora = model.get_learned_conditioning(texts)
    assert (lora - clean).abs().max() > 1e-2
    factors = a1111.read_factors([net], [net], True, {"1_model_transformer_resblocks_0_attn": model.attn})
    assert set(factors.mha) == {model.attn} and model.c_fc in factors.te.deltas
    base = a1111.EncodeWith(model, DeltaHooks(factors.te), a1111.MhaSwap(factors), -1.0).get_learned_conditioning(texts)
    torch.testing.assert_close(base, clean, atol=1e-5, rtol=0)
    assert torch.equal(model.get_learned_conditioning(texts), lora)  # nothing left behind


def test_residue_counts_what_a_run_registers_and_returns_to_the_baseline():
    """The soak test's leak check (GET /autolora/v1/residue) counts hooks on the model's modules and
    entries in the host's callback lists; it must see a live strategy and see it gone after close."""
    clean = make_model(0)
    lora_sd = lora_state_dict(clean, seed=1)
    merged = merged_copy(0, [(lora_sd, 1.0)])
    factors = factors_from_kohya(lora_sd, merged.kohya_modules())
    callback_map = {"callbacks_cfg_denoiser": [SimpleNamespace(name="autolora", script="x/autolora.py")],
                    "callbacks_ui_settings": [SimpleNamespace(name=None, script="other.py")] * 2}
    before = common.residue_counts(callback_map, [merged])
    assert before["module_hooks"] == 0 and before["callbacks_total"] == 3 and before["callbacks_autolora"] == 1
    strategy = make_strategy("batched", factors).__enter__()
    with strategy.hooks.rows(2, [(0, 1, -1.0)]):  # hooks exist only while a row plan is active
        during = common.residue_counts(callback_map, [merged])
    strategy.__exit__(None, None, None)
    after = common.residue_counts(callback_map, [merged])
    assert during["module_hooks"] > 0, during
    memory = {"resident_bytes", "resident_bytes_trimmed", "tensor_bytes", "tensor_storages"}
    assert {k: v for k, v in after.items() if k not in memory} == {k: v for k, v in before.items() if k not in memory}
    assert after["resident_bytes"] is None or after["resident_bytes"] > 0
    # The model's own weights are live tensors, so the reading is never below them.
    assert after["tensor_bytes"] >= sum(t.untyped_storage().nbytes() for t in merged.state_dict().values())
