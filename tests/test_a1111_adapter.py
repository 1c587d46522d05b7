"""The A1111 adapter, hermetic: the Lora-extension factor reader, the base text encoding and the
per-step CFG-denoiser binding, driven by stand-ins that copy A1111's call order
(tests/standins/a1111.py). The real WebUI is exercised by tests/e2e.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from standins import a1111 as sti
from helpers import lora_state_dict, make_model, merged_copy
from lib_autolora import diagnostics
from lib_autolora.base_branch import DeltaHooks, make_strategy
from lib_autolora.factors import BASE_COEF
from lib_autolora.generation import Generation
from lib_autolora.hosts import a1111
from lib_autolora.hosts.a1111 import binding, conditioning
from lib_autolora.hosts.a1111 import factors as a1111_factors
from lib_autolora.hosts.a1111.conditioning import CondPair
from demo.kohya import factors_from_kohya
from lib_autolora.params import AutoLoraSettings


GEN = "_generation"  # on the stand-in `p`: the generation the adapter would hold for it


def standin_api(host):
    return SimpleNamespace(shared=host.shared, devices=sys.modules["modules.devices"],
                           prompt_parser=sys.modules["modules.prompt_parser"])


def on_cfg_denoiser(params_):
    """What A1111Adapter.on_cfg_denoiser does for the generation it holds for `p`."""
    gen = getattr(getattr(params_.denoiser, "p", None), GEN, None)
    if gen is not None:
        binding.on_cfg_denoiser(gen.host_state.api, gen, params_)


def standin_generation(settings, host, sd_model, checkpoint=None, factors=None):
    """A Generation as A1111Adapter.start_batch sets it up, with the stand-in host's modules."""
    gen = Generation(settings, "a1111")
    gen.host_state = a1111.A1111State(standin_api(host),
                                      checkpoint=checkpoint or a1111.checkpoint_key(sd_model))
    if factors is not None:
        gen.open_strategy(factors)  # auto, free memory unknown: batched
    return gen


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
    if variant == "mid" and not merged:
        pytest.skip("A1111's functional forward does not apply the mid; covered by the skip test")
    model = make_model(0)
    net = _networks_on(model, "a", 1, te=0.7 if variant == "strengths" else 1.0, unet=1.3 if variant == "strengths" else 1.0,
                       dyn_dim=2 if variant == "dyn_dim" else None, mid=variant == "mid")
    factors = a1111_factors.read_factors([net], [net], weights_merged=merged)
    assert not factors.skipped and len(factors.te.nonzero()) > 0 and len(factors.unet.nonzero()) > 0
    g = torch.Generator().manual_seed(3)
    for nm in net.modules.values():
        sd = nm.sd_module
        delta = (factors.te if "transformer" in nm.sd_key[:20] else factors.unet).deltas[sd]
        x = torch.randn((2, sd.in_channels, 8, 8) if isinstance(sd, torch.nn.Conv2d) else (2, sd.in_features), generator=g)
        base = sd(x)
        if merged:  # the host adds calc_updown(W) to the weight
            w = sd.weight + nm.calc_updown(sd.weight)[0]
            if isinstance(sd, torch.nn.Conv2d):
                host = sd._conv_forward(x, w, sd.bias)
            else:
                host = torch.nn.functional.linear(x, w, sd.bias)
        else:
            host = nm.forward(x, base)
        torch.testing.assert_close(base + delta.forward(x), host, atol=1e-5, rtol=1e-4)


def test_factors_guided_subset_skips_and_mha():
    model = make_model(0)
    a, b = _networks_on(model, "a", 1), _networks_on(model, "b", 2)
    factors = a1111_factors.read_factors([a, b], [a], weights_merged=True)
    some = next(iter(a.modules.values())).sd_module
    assert all(t.source.endswith("a.safetensors") for d in factors.unet.deltas.values() for t in d.terms)
    assert some not in factors.exact_backup  # b touches it too: the backup is not its base
    assert a1111_factors.read_factors([a], [a], weights_merged=True).exact_backup >= {some}
    # LoRA on a GroupNorm / functional Tucker: named, kept in both branches
    norm = StandInNetwork("n")
    nm = StandInNetworkModuleLora(norm, "diffusion_model_norm", torch.nn.GroupNorm(2, 4), torch.zeros(4, 1),
                                  torch.zeros(1, 4), 1.0)
    norm.modules["k"] = nm
    f = a1111_factors.read_factors([norm], [norm], weights_merged=True)
    assert f.skipped == [("n", "k", "LoRA on a GroupNorm layer")]
    mid = _networks_on(model, "m", 3, mid=True)
    f = a1111_factors.read_factors([mid], [mid], weights_merged=False)
    assert any("Tucker" in reason for _, _, reason in f.skipped)
    # OpenCLIP: q/k/v/out of one MultiheadAttention (q/k/v map to the MHA, out to its out_proj Linear)
    mha = torch.nn.MultiheadAttention(8, 2)
    net = StandInNetwork("x")
    for part in ("q", "k", "v"):
        net.modules[f"te2_{part}"] = StandInNetworkModuleLora(net, f"1_model_transformer_resblocks_0_attn_{part}_proj", mha,
                                                             torch.randn(8, 2), torch.randn(2, 8), 2.0)
    net.modules["te2_out"] = StandInNetworkModuleLora(net, "1_model_transformer_resblocks_0_attn_out_proj", mha.out_proj,
                                                     torch.randn(8, 2), torch.randn(2, 8), 2.0)
    f = a1111_factors.read_factors([net], [net], True, {"1_model_transformer_resblocks_0_attn": mha})
    assert set(f.mha) == {mha} and {p.part for p in f.mha[mha]} == {"q", "k", "v", "out"} and not f.te.deltas
    # MhaSwap: base weights = merged - the guided updowns; put back by reference after the call
    w_in, w_out = mha.in_proj_weight.detach().clone(), mha.out_proj.weight.detach().clone()
    with torch.no_grad():  # what the host's MHA merge does
        for part, sl in (("q", slice(0, 8)), ("k", slice(8, 16)), ("v", slice(16, 24))):
            mha.in_proj_weight[sl] += net.modules[f"te2_{part}"].calc_updown(mha.in_proj_weight[sl])[0]
        mha.out_proj.weight += net.modules["te2_out"].calc_updown(mha.out_proj.weight)[0]
    merged_in = mha._parameters["in_proj_weight"]
    with a1111_factors.MhaSwap(f).swapped(-1.0):
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


def _sample(host, model_denoiser, c, uc, gen=None, steps=4, s_min_uncond=0.0, cfg_pp=False):
    """A k-diffusion Euler loop over the stand-in CFGDenoiser (what sd_samplers_kdiffusion does).
    `cfg_pp`: the step renoises with the denoiser's last_noise_uncond instead, as DDIM CFG++
    (ddim_cfgpp) does."""
    p = SimpleNamespace(comment=lambda text: None, **{GEN: gen})
    sampler = SimpleNamespace(sampler_extra_args={"cond": c, "uncond": uc})
    wraps = []

    def factory():
        wraps.append(sti.StandInModelWrap(model_denoiser))
        return wraps[-1]

    denoiser = sti.StandInCFGDenoiser(sampler, p, factory, host.shared, host.callbacks)
    denoiser.steps, denoiser.total_steps = steps, steps
    denoiser.need_last_noise_uncond = cfg_pp
    n = len(c.batch)
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 3.0
    sigmas = torch.linspace(3.0, 0.0, steps + 1)
    for i in range(steps):
        sigma = torch.full((n,), float(sigmas[i]))
        denoised = denoiser(x, sigma, uc, c, 5.0, s_min_uncond, torch.zeros(n, 1, 1, 1))
        assert denoiser._modules["model_wrap"] is wraps[0] and "combine_denoised" not in denoiser.__dict__
        if cfg_pp:
            x = denoised + (x - denoiser.last_noise_uncond) / sigmas[i] * sigmas[i + 1]
        else:
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


@contextmanager
def layout_bench(layout):
    """The stand-in host in one of LAYOUTS, the LoRA'd and clean tiny models, both branches'
    conditionings, and `sample(denoiser, c, uc, gen=None)` for the layout."""
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
        host.callbacks.on_cfg_denoiser(on_cfg_denoiser)
        host.callbacks.on_cfg_denoised(binding.on_cfg_denoised)

        def conds(te):
            c = _cond(te, [2, 7], and_weight)
            uc = [t for t in te(torch.tensor([10, 10]))]
            return c, (_long(uc) if long_uncond else uc)

        def sample(denoiser, c, uc, gen=None, cfg_pp=False):
            return _sample(host, denoiser, c, uc, gen, s_min_uncond=s_min_uncond, cfg_pp=cfg_pp)

        yield SimpleNamespace(host=host, sd_model=sd_model, unet_factors=unet_factors, merged=merged, clean=clean,
                              lora=conds(merged.text_encoder), base=conds(clean.text_encoder), sample=sample)


def _guided(bench, settings, pair, cfg_pp=False):
    """A sampling run through the binding with a Generation of `settings`; (images, its stats)."""
    gen = standin_generation(settings, bench.host, bench.sd_model, factors=bench.unet_factors)
    gen.host_state.pairs[id(bench.lora[0])] = (bench.lora[0], pair)
    got, calls = bench.sample(bench.merged.denoiser, *bench.lora, gen, cfg_pp=cfg_pp)
    gen.host_state.close_pass(gen)
    assert not gen.stats.notices, gen.stats.notices
    return got, gen.stats


@pytest.mark.parametrize("layout,strategy", [(name, "batched") for name in sorted(LAYOUTS)] +
                         [("chunked", "sequential"), ("ngms", "sequential")] +
                         [(name, "dual") for name in ("batched", "ngms", "pad", "unequal", "and_prompt")])
def test_cfg_denoiser_identities_in_every_layout(layout, strategy):
    with layout_bench(layout) as bench:
        host_lora, calls = bench.sample(bench.merged.denoiser, *bench.lora)
        host_base, _ = bench.sample(bench.clean.denoiser, *bench.base)
        assert (host_lora - host_base).abs().max() > 1e-2
        for gamma, want in ((1.0, host_lora), (0.0, host_base)):
            got, stats = _guided(bench, AutoLoraSettings(enabled=True, gamma=gamma, strategy=strategy),
                                 CondPair(base=bench.base))
            assert stats.guided_steps == 4 and stats.base_calls >= 4
            torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
        if layout in ("chunked", "unequal"):
            assert len(calls) > 4, "the layout must split the model calls"


@pytest.mark.parametrize("layout", ["batched", "ngms", "and_prompt"])
def test_ddim_cfg_pp_renoises_with_the_sampled_model(layout):
    """DDIM CFG++ renoises with the uncond rows the denoiser keeps (last_noise_uncond): γ 1 must give
    the LoRA's CFG++ run and γ 0 the base model's."""
    with layout_bench(layout) as bench:
        host_lora, _ = bench.sample(bench.merged.denoiser, *bench.lora, cfg_pp=True)
        host_base, _ = bench.sample(bench.clean.denoiser, *bench.base, cfg_pp=True)
        assert (host_lora - host_base).abs().max() > 1e-2
        for gamma, want in ((1.0, host_lora), (0.0, host_base)):
            got, stats = _guided(bench, AutoLoraSettings(enabled=True, gamma=gamma), CondPair(base=bench.base),
                                 cfg_pp=True)
            assert stats.guided_steps == 4
            torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


@contextmanager
def denoiser_bench():
    """A LoRA'd model, its LoRA-free twin, the guided factors and a stand-in host with AutoLoRA's
    denoiser callbacks registered; `c`/`uc` the LoRA'd text encoder's conditioning."""
    clean = make_model(0)
    lora_sd = lora_state_dict(clean, seed=1)
    merged = merged_copy(0, [(lora_sd, 1.0)])
    factors = factors_from_kohya(lora_sd, merged.kohya_modules())
    sd_model = SimpleNamespace(sd_checkpoint_info=SimpleNamespace(filename="x", title="x"))
    with sti.installed(sti.standin_opts(), sd_model) as host:
        host.callbacks.on_cfg_denoiser(on_cfg_denoiser)
        host.callbacks.on_cfg_denoised(binding.on_cfg_denoised)
        yield SimpleNamespace(clean=clean, merged=merged, factors=factors, sd_model=sd_model, host=host,
                              c=_cond(merged.text_encoder, [1]),
                              uc=[t for t in merged.text_encoder(torch.tensor([10]))])


def test_cfg_denoiser_interval_explicit_w_and_errors():
    with denoiser_bench() as b:
        merged, factors, sd_model, host, c, uc = b.merged, b.factors, b.sd_model, b.host, b.c, b.uc
        plain, _ = _sample(host, merged.denoiser, c, uc)

        def run_with(settings, pair=None, checkpoint=None):
            gen = standin_generation(settings, host, sd_model, checkpoint, factors=factors)
            gen.host_state.pairs[id(c)] = (c, pair or CondPair(base=None))
            out, _ = _sample(host, merged.denoiser, c, uc, gen)
            gen.host_state.close_pass(gen)
            return out, gen.stats

        # empty interval: nothing wrapped, exactly the plain run
        out, stats = run_with(AutoLoraSettings(enabled=True, start=1.0, end=1.0))
        assert torch.equal(out, plain) and stats.plain_steps == 4 and stats.base_calls == 0
        out, stats = run_with(AutoLoraSettings(enabled=True, start=0.5, end=1.0))
        assert stats.guided_steps == 2 and stats.plain_steps == 2
        # γ=1 with w2 = 5 (= the CFG scale) is the plain run; w2 = 3 is not
        out, _ = run_with(AutoLoraSettings(enabled=True, gamma=1.0, w2=5.0))
        torch.testing.assert_close(out, plain, atol=2e-4, rtol=0)
        out, _ = run_with(AutoLoraSettings(enabled=True, gamma=1.0, w2=3.0))
        assert (out - plain).abs().max() > 1e-3
        # refiner switch (another checkpoint): guidance stops, with a notice
        out, stats = run_with(AutoLoraSettings(enabled=True), checkpoint=("other",))
        assert torch.equal(out, plain) and "refiner" in stats.notices[0]
        # base conditioning of another shape: a notice, the step runs plain
        bad = CondPair(base=(_cond(merged.text_encoder, [1, 2]), uc))
        out, stats = run_with(AutoLoraSettings(enabled=True), bad)
        assert torch.equal(out, plain) and stats.notices


def test_an_error_of_autolora_inside_a_step_gives_the_plain_image_and_says_so():
    """The base branch raising (here the strategy itself) is not the WebUI's error: the step is the
    host's own, guidance stops for the generation, the stats and a notice name the error."""
    with denoiser_bench() as b:
        merged, factors, sd_model, host, c, uc = b.merged, b.factors, b.sd_model, b.host, b.c, b.uc
        plain, _ = _sample(host, merged.denoiser, c, uc)
        gen = standin_generation(AutoLoraSettings(enabled=True, gamma=1.5), host, sd_model, factors=factors)
        gen.host_state.pairs[id(c)] = (c, CondPair(base=None))

        def broken(*args):
            raise RuntimeError("base branch broke")

        gen.strategy.evaluate = broken
        out, _ = _sample(host, merged.denoiser, c, uc, gen)
        gen.host_state.close_pass(gen)
    assert torch.equal(out, plain)
    assert gen.stats.failure == "RuntimeError: base branch broke" and gen.stats.guided_steps == 0
    assert any("AutoLoRA failed at step 1" in n for n in gen.stats.notices)
    assert gen.strategy is None and all(not m._forward_hooks for m in merged.modules())


def test_a_guided_step_reads_no_tensor_value_on_the_host():
    """Nothing AutoLoRA does on A1111's step reads a tensor's value back to the host (a device sync
    on a GPU): a guided run makes as many such reads as the plain run."""
    from test_forge_adapter import CountSyncs
    with denoiser_bench() as b:
        clean, merged, factors, sd_model, host, c, uc = b.clean, b.merged, b.factors, b.sd_model, b.host, b.c, b.uc
        base = (_cond(clean.text_encoder, [1]), [t for t in clean.text_encoder(torch.tensor([10]))])
        with CountSyncs() as plain:
            _sample(host, merged.denoiser, c, uc)
        for strategy in ("batched", "dual", "sequential", "swap"):
            gen = standin_generation(AutoLoraSettings(enabled=True, strategy=strategy), host, sd_model, factors=factors)
            gen.host_state.pairs[id(c)] = (c, CondPair(base=base))
            _sample(host, merged.denoiser, c, uc, gen, steps=1)  # the first step prepares
            with CountSyncs() as guided:
                _sample(host, merged.denoiser, c, uc, gen)
            gen.host_state.close_pass(gen)
            assert gen.stats.guided_steps == 5 and guided.reads == plain.reads, (strategy, plain.reads, guided.reads)


def test_model_exception_mid_step_leaves_the_denoiser_clean():
    with denoiser_bench() as b:
        merged, factors, sd_model, host, c, uc = b.merged, b.factors, b.sd_model, b.host, b.c, b.uc
        gen = standin_generation(AutoLoraSettings(enabled=True), host, sd_model, factors=factors)
        gen.host_state.pairs[id(c)] = (c, CondPair(base=None))
        p = SimpleNamespace(comment=lambda text: None, **{GEN: gen})
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
        assert isinstance(denoiser._modules["model_wrap"], binding.StepProxy)  # left by the failed step...
        gen.host_state.close_pass(gen)  # ...and removed by finish / the next start
        assert denoiser._modules["model_wrap"] is real and "combine_denoised" not in denoiser.__dict__
        assert not gen.strategy and all(not m._forward_hooks for m in merged.modules())


def test_base_text_encoding_with_sequence_first_layers_and_mha():
    """OpenCLIP (SDXL's second text encoder) runs its layers on (tokens, batch, dim) tensors and its
    attention is a MultiheadAttention the Lora extension always merges: the base encoding must
    remove the LoRA from both, for any batch size."""
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
    factors = a1111_factors.read_factors([net], [net], True, {"1_model_transformer_resblocks_0_attn": model.attn})
    assert set(factors.mha) == {model.attn} and model.c_fc in factors.te.deltas
    wrapper = conditioning.EncodeWith(model, DeltaHooks(factors.te), a1111_factors.MhaSwap(factors), BASE_COEF)
    base = wrapper.get_learned_conditioning(texts)
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
    before = diagnostics.residue_counts(callback_map, [merged])
    assert before["module_hooks"] == 0 and before["callbacks_total"] == 3 and before["callbacks_autolora"] == 1
    strategy = make_strategy("batched", factors).__enter__()
    with strategy.hooks.rows(2, [(0, 1, -1.0)]):  # hooks exist only while a row plan is active
        during = diagnostics.residue_counts(callback_map, [merged])
    strategy.__exit__(None, None, None)
    after = diagnostics.residue_counts(callback_map, [merged])
    assert during["module_hooks"] > 0, during
    memory = {"resident_bytes", "resident_bytes_trimmed", "tensor_bytes", "tensor_storages"}
    assert {k: v for k, v in after.items() if k not in memory} == {k: v for k, v in before.items() if k not in memory}
    assert after["resident_bytes"] is None or after["resident_bytes"] > 0
    # The model's own weights are live tensors, so the reading is never below them.
    assert after["tensor_bytes"] >= sum(t.untyped_storage().nbytes() for t in merged.state_dict().values())


class StandInReForgeDenoiser:
    """reForge's sd_samplers_cfg_denoiser.CFGDenoiser.forward, in the order that matters: the
    callback runs, then its own backend samples (ldm_patched `sampling_function` on the Forge UNet
    patcher); `self.inner_model` is never called, combine_denoised only re-combines the result."""

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond, **kwargs):
        cfg_denoiser_callback(None)  # noqa: F821 - read as source, never run
        denoised = sampling_function(None, x, sigma, uncond, cond, cond_scale, {}, None)  # noqa: F821
        return self.combine_denoised(denoised, None, uncond, cond_scale)


class StandInForgeClassicDenoiser:
    """Forge Classic's forward: the callback, then `forge_sampler.forge_sample(self, ...)`."""

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        cfg_denoiser_callback(None)  # noqa: F821
        return forge_sampler.forge_sample(self, denoiser_params=None, cond_scale=cond_scale)  # noqa: F821


def test_the_a1111_binding_is_chosen_by_what_the_cfg_denoiser_does():
    """A1111's own step (callback, model calls through inner_model, combine_denoised) can carry
    AutoLoRA; WebUIs that kept the class but sample through another backend cannot, and say why."""
    assert a1111.missing_capability(SimpleNamespace(CFGDenoiser=sti.StandInCFGDenoiser)) is None
    reforge = a1111.missing_capability(SimpleNamespace(CFGDenoiser=StandInReForgeDenoiser))
    assert "sampling_function" in reforge and "not support" in reforge
    classic = a1111.missing_capability(SimpleNamespace(CFGDenoiser=StandInForgeClassicDenoiser))
    assert "forge_sample" in classic
    assert "no CFGDenoiser" in a1111.missing_capability(SimpleNamespace())


def test_sd3_fused_qkv_lora_parts_are_one_exact_term_on_the_fused_layer():
    """SD3's MMDiT runs q, k and v as one fused Linear (QkvLinear); A1111's Lora extension maps a
    LoRA's split to_q/to_k/to_v onto it and, only when all three are there, adds the vstack of their
    updowns to the fused weight (networks.network_apply_weights). In lora_functional it skips them."""
    torch.manual_seed(0)
    d, r = 8, 2
    fused = torch.nn.Linear(d, 3 * d)
    net = StandInNetwork("sd3")
    parts = {}
    for part in ("q", "k", "v"):
        key = f"diffusion_model_joint_blocks_0_x_block_attn_qkv_{part}_proj"
        parts[part] = net.modules[key] = StandInNetworkModuleLora(net, key, fused, torch.randn(d, r), torch.randn(r, d), 2.0)
    x = torch.randn(5, d)
    base = fused(x)
    w = fused.weight.detach() + torch.vstack([parts[p].calc_updown(chunk)[0]
                                              for p, chunk in zip("qkv", fused.weight.detach().chunk(3, 0))])
    host = torch.nn.functional.linear(x, w, fused.bias)
    factors = a1111_factors.read_factors([net], [net], weights_merged=True)
    assert not factors.skipped and list(factors.unet.deltas) == [fused]
    torch.testing.assert_close(base + factors.unet.deltas[fused].forward(x), host, atol=1e-5, rtol=1e-4)
    functional = a1111_factors.read_factors([net], [net], weights_merged=False)
    assert not functional.unet.deltas and "lora_functional" in functional.skipped[0][2]
    del net.modules["diffusion_model_joint_blocks_0_x_block_attn_qkv_v_proj"]
    partial = a1111_factors.read_factors([net], [net], weights_merged=True)
    assert not partial.unet.deltas and "only some of q/k/v" in partial.skipped[0][2]


@pytest.mark.parametrize("layout", ["batched", "ngms", "and_prompt"])
def test_the_controls_identities_through_the_cfg_denoiser(layout):
    """As on Forge: base_strength 1 gives the plain LoRA run at any γ, a cap of 0 the base run, any
    schedule at γ 1 the plain LoRA run; with NGMS steps (no uncond) too."""
    with layout_bench(layout) as bench:
        host_lora, _ = bench.sample(bench.merged.denoiser, *bench.lora)
        host_base, _ = bench.sample(bench.clean.denoiser, *bench.base)
        same, _ = _guided(bench, AutoLoraSettings(enabled=True, gamma=3.0, base_strength=1.0), CondPair())
        torch.testing.assert_close(same, host_lora, atol=2e-4, rtol=0)
        capped, _ = _guided(bench, AutoLoraSettings(enabled=True, gamma=2.5, cap=0.0), CondPair(base=bench.base))
        torch.testing.assert_close(capped, host_base, atol=2e-4, rtol=0)
        scheduled, _ = _guided(bench, AutoLoraSettings(enabled=True, gamma=1.0, schedule="middle"),
                               CondPair(base=bench.base))
        torch.testing.assert_close(scheduled, host_lora, atol=2e-4, rtol=0)
