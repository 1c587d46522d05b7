"""The Forge adapter's hooks, driven by the stand-ins of Forge's sampling code in
tests/standins/forge.py (no Forge needed)."""
from __future__ import annotations

import collections
import copy
import functools
import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lib_autolora.factors import DenseTerm
from lib_autolora.generation import Generation
from lib_autolora.hosts.forge import ForgeState
from lib_autolora.hosts.forge.conditioning import scaled_text_encoder
from lib_autolora.hosts.forge.factors import base_weight, read_factors
from lib_autolora.hosts.forge.patcher import originals
from lib_autolora.hosts.forge.sampling import Sampling
from lib_autolora.params import AutoLoraSettings
from standins.forge import (
    standin_merge_lora_to_weight, standin_compile_conditions,
    standin_compile_weighted_conditions, standin_compute_cond_mark, standin_compute_cond_indices,
    standin_calc_cond_uncond_batch, standin_sampling_function_inner, StandInLinear, StandInKModel,
    lora_patch, forge_lora_patches, merge_offline, standin_api, StandInForgeModelPatcher, schedules_of,
    standin_reconstruct_cond_batch,
    standin_reconstruct_multicond_batch)

def originals_of(model):
    """The originals Forge main keeps for `model` (its lora_loader backup), as the adapter reads them."""
    return originals(SimpleNamespace(model=model))


def standin_generation(settings, p=None):
    gen = Generation(settings, "forge")
    gen.host_state = ForgeState()
    gen.loaded, gen.guided = ("A.safetensors", "B.safetensors"), frozenset({"A.safetensors"})
    return gen


def weights_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- a test bench: the LoRA'd model, the LoRA-free model, text conditionings -------------------------

class Bench:
    def __init__(self, nonlinear=False, pooled=True, batch=2, and_weights=(1.0,), guidance=None):
        torch.manual_seed(0)
        self.model = StandInKModel().eval()
        self.clean = copy.deepcopy(self.model)
        self.lora_patches = forge_lora_patches(self.model, nonlinear=nonlinear)
        merge_offline(self.model, self.lora_patches)
        self.base_model = copy.deepcopy(self.clean)  # what the base branch must equal: B only
        merge_offline(self.base_model, self.lora_patches, only={"B.safetensors"})
        g = torch.Generator().manual_seed(3)
        n = len(and_weights)
        self.x = torch.randn(batch, 4, 4, 4, generator=g)
        self.sigma = torch.full((batch,), 1.2)
        self.texts = {}
        for branch in ("lora", "base"):  # the LoRA'd and the LoRA-free text encoder's outputs
            crossattn_c = torch.randn(batch * n, 5, 8, generator=g)
            crossattn_u = torch.randn(batch, 5, 8, generator=g)
            if pooled:
                c = {"crossattn": crossattn_c, "vector": torch.randn(batch * n, 6, generator=g)}
                u = {"crossattn": crossattn_u, "vector": torch.randn(batch, 6, generator=g)}
                if guidance is not None:  # Flux (backend/diffusion_engine/flux.py: cond['guidance'])
                    c["guidance"] = torch.full((batch * n,), guidance)
                    u["guidance"] = torch.full((batch,), guidance)
            else:
                c, u = crossattn_c, crossattn_u
            composition = [[(i * n + j, w) for j, w in enumerate(and_weights)] for i in range(batch)]
            self.texts[branch] = schedules_of(c, u, composition)  # as the host caches them

    def entries(self, branch, step=0):
        """The step's condition entries, as the host's sampling_function makes them."""
        multicond, uncond = self.texts[branch]
        composition, c = standin_reconstruct_multicond_batch(multicond, step)
        return (standin_compile_weighted_conditions(c, composition),
                standin_compile_conditions(standin_reconstruct_cond_batch(uncond, step)))

    def plain(self, model, branch, cond_scale, options=None, max_entries=99):
        cond, uncond = self.entries(branch)
        return standin_sampling_function_inner(
            model, self.x, self.sigma, uncond, cond, cond_scale, options or {},
            lambda *a: standin_calc_cond_uncond_batch(*a, max_entries=max_entries))

    def autolora(self, settings, cond_scale, options=None, max_entries=99, step=(0, 4), base_text=True,
                 sampler_options=None, after_step=None):
        """One sampling_function call with AutoLoRA on: `options` are the UNet patcher's model
        options, `sampler_options` those the sampler passes (Forge Neo: they update the patcher's)."""
        api = standin_api(max_entries)
        ff = read_factors(self.model, self.lora_patches, {"A.safetensors"}, merge=api.merge_lora_to_weight,
                          original=originals_of(self.model))
        p = SimpleNamespace(sampler=SimpleNamespace(model_wrap_cfg=SimpleNamespace(step=step[0], total_steps=step[1])),
                            comment=lambda text: None)
        gen = standin_generation(settings, p)
        record = gen.stats
        conds = {"base_c": self.texts["base"][0], "base_uc": self.texts["base"][1]} if base_text else {}
        unet = SimpleNamespace(model=self.model, model_options=dict(options or {}))
        sampling = Sampling(api, gen, p, unet, ff, conds)
        unet.model_options["sampler_pre_cfg_function"] = \
            unet.model_options.get("sampler_pre_cfg_function", []) + [sampling.pre_cfg_function()]
        options = copy.deepcopy(unet.model_options)  # Forge deep-copies model_options on every patcher clone
        options.update(sampler_options or {})
        cond, uncond = self.entries("lora")
        try:
            out = standin_sampling_function_inner(
                self.model, self.x, self.sigma, uncond, cond, cond_scale, options,
                lambda *a: standin_calc_cond_uncond_batch(*a, max_entries=max_entries))
            if after_step is not None:  # what Forge's CFGDenoiser does after sampling_function, callbacks included
                after_step(sampling)
        finally:
            sampling.close()
        return out, record, sampling


TOL = 2e-5


@pytest.mark.parametrize("strategy", ["batched", "dual", "sequential", "swap"])
@pytest.mark.parametrize("max_entries", [99, 1])
@pytest.mark.parametrize("pooled", [True, False])
def test_identities_through_forge_sampling(strategy, max_entries, pooled):
    bench = Bench(pooled=pooled)
    before = weights_of(bench.model)
    lora = bench.plain(bench.model, "lora", 7.0)
    base = bench.plain(bench.base_model, "base", 7.0)
    assert (lora - base).abs().max() > 100 * TOL
    g1, record, sampling = bench.autolora(AutoLoraSettings(enabled=True, gamma=1.0, strategy=strategy), 7.0,
                                          max_entries=max_entries)
    torch.testing.assert_close(g1, lora, atol=TOL, rtol=0)
    assert record.guided_steps == 1 and record.base_calls >= 1
    assert record.strategy == strategy and record.strategy_setup_ms >= 0  # the set-up was timed
    g0, _, _ = bench.autolora(AutoLoraSettings(enabled=True, gamma=0.0, strategy=strategy), 7.0,
                              max_entries=max_entries)
    torch.testing.assert_close(g0, base, atol=TOL, rtol=0)
    w = bench.autolora(AutoLoraSettings(enabled=True, gamma=1.5, w1=3.0, w2=5.0, strategy=strategy), 7.0,
                       max_entries=max_entries)[0]
    want = bench.plain(bench.base_model, "base", 3.0)
    want = want + (bench.plain(bench.model, "lora", 5.0) - want) * 1.5
    torch.testing.assert_close(w, want, atol=1e-4, rtol=0)
    after = weights_of(bench.model)
    assert all(torch.equal(before[k], after[k]) for k in before), "weights must be bit-identical afterwards"


def test_batched_runs_both_branches_in_one_forward_per_batch():
    bench = Bench()
    bench.model.calls = 0
    bench.autolora(AutoLoraSettings(enabled=True, strategy="batched"), 7.0)
    assert bench.model.calls == 1, "cond+uncond of both branches in one forward"
    bench.model.calls = 0
    bench.autolora(AutoLoraSettings(enabled=True, strategy="sequential"), 7.0)
    assert bench.model.calls == 2


def test_and_prompt_weights_and_no_uncond_pass():
    bench = Bench(and_weights=(1.0, 0.6))
    lora, base = bench.plain(bench.model, "lora", 6.0), bench.plain(bench.base_model, "base", 6.0)
    g0 = bench.autolora(AutoLoraSettings(enabled=True, gamma=0.0), 6.0)[0]
    g1 = bench.autolora(AutoLoraSettings(enabled=True, gamma=1.0), 6.0)[0]
    torch.testing.assert_close(g0, base, atol=TOL, rtol=0)
    torch.testing.assert_close(g1, lora, atol=TOL, rtol=0)
    # CFG 1 (and Flux): Forge skips the uncond pass; AutoLoRA is the two-evaluation blend
    lora1, base1 = bench.plain(bench.model, "lora", 1.0), bench.plain(bench.base_model, "base", 1.0)
    out = bench.autolora(AutoLoraSettings(enabled=True, gamma=1.5), 1.0)[0]
    torch.testing.assert_close(out, base1 + (lora1 - base1) * 1.5, atol=1e-4, rtol=0)


def test_lora_scale_scales_the_guided_lora_in_the_lora_branch():
    bench = Bench()
    half = copy.deepcopy(bench.clean)
    patches = copy.deepcopy(bench.lora_patches)
    for entries in patches[("A.safetensors", 1.0, 1.0, False)].values():
        for e in entries:
            e[0] = 0.5
    merge_offline(half, patches)
    out = bench.autolora(AutoLoraSettings(enabled=True, gamma=1.0, lora_scale=0.5, base_text_encoder=False), 7.0)[0]
    torch.testing.assert_close(out, bench.plain(half, "lora", 7.0), atol=TOL, rtol=0)


def test_interval_outside_is_the_plain_step_with_no_extra_call():
    bench = Bench()
    lora = bench.plain(bench.model, "lora", 7.0)
    bench.model.calls = 0
    out, record, _ = bench.autolora(AutoLoraSettings(enabled=True, start=0.5, end=1.0), 7.0, step=(1, 4))
    assert torch.equal(out, lora) and bench.model.calls == 1
    assert record.plain_steps == 1 and record.guided_steps == 0


def test_another_cfg_function_is_applied_to_each_branch():
    """Dynamic thresholding sets sampler_cfg_function; AutoLoRA applies it per branch, then blends."""
    def standin_dynthres(args):  # the shape of DynamicThresholdingNode's sampler_dyn_thresh
        cond, uncond = args["input"] - args["cond"], args["input"] - args["uncond"]
        out = uncond + (cond - uncond) * args["cond_scale"]
        return args["input"] - out.clamp(-1.5, 1.5)

    bench = Bench()
    options = {"sampler_cfg_function": standin_dynthres}
    lora = bench.plain(bench.model, "lora", 7.0, options)
    base = bench.plain(bench.base_model, "base", 7.0, options)
    torch.testing.assert_close(bench.autolora(AutoLoraSettings(enabled=True, gamma=1.0), 7.0, options)[0], lora,
                               atol=TOL, rtol=0)
    torch.testing.assert_close(bench.autolora(AutoLoraSettings(enabled=True, gamma=0.0), 7.0, options)[0], base,
                               atol=TOL, rtol=0)


def test_post_cfg_model_calls_see_the_plain_lora_model():
    """Perturbed attention calls calc_cond_uncond_batch again from a post-CFG function with the
    step's cond list: AutoLoRA's extra model_conds are stripped and no hook is active."""
    bench = Bench()
    seen = {}

    def standin_pag(args):
        cond_pred, _ = standin_calc_cond_uncond_batch(args["model"], args["cond"], None, args["input"], args["sigma"],
                                                      args["model_options"].copy())
        seen["pred"] = cond_pred
        return args["denoised"]

    options = {"sampler_post_cfg_function": [standin_pag]}
    bench.autolora(AutoLoraSettings(enabled=True), 7.0, options)
    cond, _ = bench.entries("lora")
    want, _ = standin_calc_cond_uncond_batch(bench.model, cond, None, bench.x, bench.sigma, {})
    torch.testing.assert_close(seen["pred"], want, atol=1e-6, rtol=0)


def standin_euler_cfg_pp_step(run, x, sigma, sigma_next):
    """One step of Forge Neo's sample_euler_cfg_pp (modules/sd_samplers_cfgpp.py): its post-CFG
    function keeps the unconditional prediction, and the step renoises with it."""
    temp = [0]

    def post_cfg_function(args):
        temp[0] = args["uncond_denoised"]
        return args["denoised"]

    denoised = run({"sampler_post_cfg_function": [post_cfg_function], "disable_cfg1_optimization": True})
    d = (x - temp[0]) / sigma.reshape(-1, 1, 1, 1)  # k_diffusion.sampling.to_d
    return denoised + d * sigma_next


@pytest.mark.parametrize("cond_scale", [1.0, 1.5, 6.0])
def test_cfg_pp_sampler_renoises_with_the_sampled_model(cond_scale):
    """CFG++ renoises with the unconditional prediction: γ 1 must give the LoRA's step and γ 0 the
    base model's, so the sampler's own post-CFG function sees the sampled model's predictions."""
    bench = Bench()
    sigma_next = 0.7

    def plain(model, branch):
        return standin_euler_cfg_pp_step(lambda extra: bench.plain(model, branch, cond_scale, extra),
                                         bench.x, bench.sigma, sigma_next)

    def autolora(gamma):
        settings = AutoLoraSettings(enabled=True, gamma=gamma)
        return standin_euler_cfg_pp_step(lambda extra: bench.autolora(settings, cond_scale, sampler_options=extra)[0],
                                         bench.x, bench.sigma, sigma_next)

    lora, base = plain(bench.model, "lora"), plain(bench.base_model, "base")
    assert (lora - base).abs().max() > 100 * TOL
    torch.testing.assert_close(autolora(1.0), lora, atol=TOL, rtol=0)
    torch.testing.assert_close(autolora(0.0), base, atol=TOL, rtol=0)
    # γ 1.5: the step of the blended model, uncond and all
    lora_den, base_den = bench.plain(bench.model, "lora", cond_scale), bench.plain(bench.base_model, "base", cond_scale)
    lora_u0, base_u0 = bench.plain(bench.model, "lora", 0.0), bench.plain(bench.base_model, "base", 0.0)
    denoised, uncond = base_den + 1.5 * (lora_den - base_den), base_u0 + 1.5 * (lora_u0 - base_u0)
    want = denoised + (bench.x - uncond) / bench.sigma.reshape(-1, 1, 1, 1) * sigma_next
    torch.testing.assert_close(autolora(1.5), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 1.5])
def test_ddim_cfg_pp_last_noise_uncond_is_the_sampled_models(gamma):
    """Forge's CFGDenoiser keeps last_noise_uncond = (x - uncond_pred) / sigma from the LoRA branch's
    uncond prediction for DDIM CFG++; after a guided step the after-CFG callback moves it to the
    sampled model's: the base's at γ 0, the LoRA's at γ 1."""
    bench = Bench()
    lora_u, base_u = bench.plain(bench.model, "lora", 0.0), bench.plain(bench.base_model, "base", 0.0)
    sigma = bench.sigma.reshape(-1, 1, 1, 1)
    denoiser = SimpleNamespace(need_last_noise_uncond=True)

    def standin_forge_cfg_denoiser_tail(sampling):
        denoiser.last_noise_uncond = (bench.x - lora_u) / sigma  # sd_samplers_cfg_denoiser.forward
        sampling.correct_last_noise_uncond(denoiser)  # AutoLoRA's on_cfg_after_cfg

    bench.autolora(AutoLoraSettings(enabled=True, gamma=gamma), 7.0, after_step=standin_forge_cfg_denoiser_tail)
    want = (bench.x - (base_u + gamma * (lora_u - base_u))) / sigma
    torch.testing.assert_close(denoiser.last_noise_uncond, want, atol=1e-4, rtol=0)
    # a sampler that does not ask for it, or a step AutoLoRA did not guide, is left alone
    denoiser = SimpleNamespace(need_last_noise_uncond=False)
    bench.autolora(AutoLoraSettings(enabled=True, gamma=gamma), 7.0, after_step=standin_forge_cfg_denoiser_tail)
    torch.testing.assert_close(denoiser.last_noise_uncond, (bench.x - lora_u) / sigma, atol=0, rtol=0)


def test_post_cfg_function_added_by_a_later_extension_still_sees_the_lora_branch():
    """Perturbed attention's script may run after AutoLoRA's: it clones the patcher Forge will sample
    with and adds its post-CFG function there. That function is the model's, not the sampler's."""
    bench = Bench()
    seen = {}

    def standin_pag(args):
        seen["cond"] = args["cond_denoised"]
        return args["denoised"]

    api = standin_api(99)
    ff = read_factors(bench.model, bench.lora_patches, {"A.safetensors"}, merge=api.merge_lora_to_weight,
                      original=originals_of(bench.model))
    ours = SimpleNamespace(model=bench.model, model_options={})
    later = SimpleNamespace(model=bench.model, model_options={"sampler_post_cfg_function": [standin_pag]})
    p = SimpleNamespace(sampler=SimpleNamespace(model_wrap_cfg=SimpleNamespace(step=0, total_steps=4)),
                        comment=lambda text: None, sd_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=later)))
    gen = standin_generation(AutoLoraSettings(enabled=True, gamma=0.0), p)
    sampling = Sampling(api, gen, p, ours, ff, {"base_c": bench.texts["base"][0], "base_uc": bench.texts["base"][1]})
    options = {"sampler_pre_cfg_function": [sampling.pre_cfg_function()], "sampler_post_cfg_function": [standin_pag]}
    cond, uncond = bench.entries("lora")
    try:
        standin_sampling_function_inner(bench.model, bench.x, bench.sigma, uncond, cond, 7.0, options,
                                        lambda *a: standin_calc_cond_uncond_batch(*a))
    finally:
        sampling.close()
    torch.testing.assert_close(seen["cond"], bench.plain(bench.model, "lora", 1.0), atol=TOL, rtol=0)


def test_post_cfg_functions_on_the_model_still_see_the_lora_branch():
    """A post-CFG function on the UNet patcher (self-attention guidance reads uncond_denoised and
    re-runs the LoRA model) gets the LoRA branch's predictions, as without AutoLoRA."""
    bench = Bench()
    seen = {}

    def standin_sag(args):
        seen["uncond"] = args["uncond_denoised"]
        return args["denoised"]

    bench.autolora(AutoLoraSettings(enabled=True, gamma=0.0), 7.0, {"sampler_post_cfg_function": [standin_sag]})
    torch.testing.assert_close(seen["uncond"], bench.plain(bench.model, "lora", 0.0), atol=TOL, rtol=0)


def test_weights_restored_when_the_step_raises():
    bench = Bench()
    before = weights_of(bench.model)

    def boom(args):
        raise RuntimeError("interrupted")

    for strategy in ("swap", "batched", "dual"):
        with pytest.raises(RuntimeError):
            bench.autolora(AutoLoraSettings(enabled=True, strategy=strategy), 7.0,
                           {"sampler_post_cfg_function": [boom]})
        after = weights_of(bench.model)
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert not any(m._forward_hooks for m in bench.model.modules()), "no hook may stay registered"


# -- factors read from Forge's patches ----------------------------------------------------------------

def test_factors_low_rank_with_fused_qkv_offsets():
    bench = Bench()
    ff = read_factors(bench.model, bench.lora_patches, {"A.safetensors"}, merge=standin_merge_lora_to_weight,
                      original=originals_of(bench.model))
    assert not ff.dense and not ff.skipped and ff.files == {"A.safetensors"}
    dm, base_dm = bench.model.diffusion_model, bench.base_model.diffusion_model
    for name in ("conv", "to_k", "qkv", "vec", "out"):
        module = getattr(dm, name)
        delta = ff.factors.deltas[module]
        rank = sum(t.rank for t in delta.terms)
        assert all(not isinstance(t, DenseTerm) for t in delta.terms) and rank <= 4, name
        torch.testing.assert_close(module.weight - delta.delta_weight(), getattr(base_dm, name).weight,
                                   atol=1e-5, rtol=0)


def test_nonlinear_patches_become_an_exact_dense_delta():
    bench = Bench(nonlinear=True)
    ff = read_factors(bench.model, bench.lora_patches, {"A.safetensors"}, merge=standin_merge_lora_to_weight,
                      original=originals_of(bench.model))
    assert ff.dense == ["diffusion_model.out.weight"] and "exact dense delta" in ff.message("UNet")
    out = bench.model.diffusion_model.out
    torch.testing.assert_close(out.weight - ff.factors.deltas[out].delta_weight(),
                               bench.base_model.diffusion_model.out.weight, atol=1e-5, rtol=0)
    g0 = bench.autolora(AutoLoraSettings(enabled=True, gamma=0.0), 7.0)[0]
    torch.testing.assert_close(g0, bench.plain(bench.base_model, "base", 7.0), atol=TOL, rtol=0)


def test_swap_base_weight_is_the_original_with_unguided_loras_merged_back():
    bench = Bench()
    ff = read_factors(bench.model, bench.lora_patches, {"A.safetensors"}, merge=standin_merge_lora_to_weight,
                      original=originals_of(bench.model))
    for name in ("conv", "to_k", "out"):
        info = ff.params[getattr(bench.model.diffusion_model, name)]
        w = base_weight(info, merge=standin_merge_lora_to_weight, original=originals_of(bench.model))
        assert torch.equal(w, getattr(bench.base_model.diffusion_model, name).weight)


def test_bias_patches_are_reported_not_silently_dropped():
    bench = Bench()
    patches = copy.deepcopy(bench.lora_patches)
    patches[("A.safetensors", 1.0, 1.0, False)]["diffusion_model.out.bias"] = [[1.0, (torch.ones(4),), 1.0, None, None]]
    ff = read_factors(bench.model, patches, {"A.safetensors"}, merge=standin_merge_lora_to_weight,
                      original=originals_of(bench.model))
    assert ff.skipped and "bias" in ff.message("UNet")


def test_text_encoder_hooks_give_the_lora_free_encoder():
    """Base conditioning: hooks subtracting the guided LoRA on every row, any batch size."""
    torch.manual_seed(5)
    te = torch.nn.Sequential(StandInLinear(8, 8), torch.nn.GELU(), StandInLinear(8, 8)).eval()
    clean = copy.deepcopy(te)
    patches = {("A.safetensors", 0.8, 1.0, False): {"0.weight": [lora_patch((8, 8), 2, 7, strength=0.8)],
                                                     "2.weight": [lora_patch((8, 8), 2, 8, strength=0.8)]}}
    wrapper = SimpleNamespace(lora_loader=SimpleNamespace(backup={}))
    te.lora_loader = wrapper.lora_loader
    merge_offline(te, patches)
    ff = read_factors(te, patches, {"A.safetensors"}, merge=standin_merge_lora_to_weight, original=originals_of(te))
    x = torch.randn(3, 5, 8)
    assert (te(x) - clean(x)).abs().max() > 1e-2
    with scaled_text_encoder(ff.factors, -1.0):
        torch.testing.assert_close(te(x), clean(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(te(x[:1]), clean(x[:1]), atol=1e-5, rtol=0)
    assert not any(m._forward_hooks for m in te.modules())


def test_a_finished_pass_holds_nothing_and_its_function_passes_through():
    """Forge may keep the patcher clone (with our pre-CFG function in its model_options) in its
    loaded-models list after the generation: once closed, the pass must hold no factors, conds or
    `p`, and its function, if still called, must change nothing (the soak's memory leak)."""
    bench = Bench()
    lora = bench.plain(bench.model, "lora", 7.0)
    guided, _, sampling = bench.autolora(AutoLoraSettings(enabled=True), 7.0)
    assert not torch.allclose(guided, lora)
    assert sampling.guided is None and sampling.p is None and sampling.conds == {} and sampling.gen.strategy is None
    bench.model.calls = 0
    again = bench.plain(bench.model, "lora", 7.0, options={"sampler_pre_cfg_function": [sampling.pre_cfg_function()]})
    assert torch.equal(again, lora) and bench.model.calls == 1


# -- per-step cost: no device syncs of our own, no per-step memory queries ----------------------------

class CountSyncs(TorchDispatchMode):
    """Operator calls that read a tensor's value on the host (a device sync on a GPU)."""

    READS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal")

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += str(func.overloadpacket) in self.READS
        return func(*args, **(kwargs or {}))


def _counting_api(counts: collections.Counter):
    """The stand-in host API, counting its functions that synchronise on a GPU (the sync-debug
    run's call sites): compiling conditions indexes device tensors with a list, a cond mark is a
    copy from pageable host memory."""
    api = standin_api()
    for name in ("compile_conditions", "compile_weighted_conditions", "compute_cond_mark"):
        setattr(api, name, functools.partial(lambda fn, name, *a: counts.update([name]) or fn(*a),
                                             getattr(api, name), name))
    api.calc_cond_uncond_batch = functools.partial(
        standin_calc_cond_uncond_batch, compute_cond_mark=api.compute_cond_mark)
    return api


@pytest.mark.parametrize("strategy", ["batched", "dual"])
def test_a_guided_step_adds_no_synchronising_call_over_plain(strategy):
    """Per guided step (after the first, which builds the pass's caches) AutoLoRA makes no host
    function call that synchronises and reads no tensor value on the host, over what plain
    sampling does; `auto` picks these one-forward strategies for one image."""
    bench = Bench()
    counts = collections.Counter()
    api = _counting_api(counts)
    ff = read_factors(bench.model, bench.lora_patches, {"A.safetensors"}, merge=api.merge_lora_to_weight,
                      original=originals_of(bench.model))
    p = SimpleNamespace(sampler=SimpleNamespace(model_wrap_cfg=SimpleNamespace(step=0, total_steps=4)),
                        comment=lambda text: None)
    gen = standin_generation(AutoLoraSettings(enabled=True, strategy=strategy), p)
    sampling = Sampling(api, gen, p, SimpleNamespace(model=bench.model), ff,
                        {"base_c": bench.texts["base"][0], "base_uc": bench.texts["base"][1]})
    options = {"sampler_pre_cfg_function": [sampling.pre_cfg_function()]}

    def one_step(step, model_options):
        p.sampler.model_wrap_cfg.step = step
        cond, uncond = bench.entries("lora", step)  # the host's own compile, in plain sampling too
        counts.clear()
        with CountSyncs() as reads:
            standin_sampling_function_inner(bench.model, bench.x, bench.sigma, uncond, cond, 7.0,
                                            copy.deepcopy(model_options), api.calc_cond_uncond_batch)
        return dict(counts), reads.reads

    try:
        plain = one_step(1, {})
        one_step(0, options)
        guided = [one_step(step, options) for step in (1, 2)]
    finally:
        sampling.close()
    assert gen.stats.guided_steps == 3
    assert guided == [plain, plain], f"plain {plain}, guided {guided}"


def test_prompt_editing_compiles_the_base_text_again_when_the_schedule_moves():
    """`[a:b:2]`: the base branch's cached text entries follow the prompt schedule step by step."""
    bench = Bench()
    g = torch.Generator().manual_seed(9)
    rows = {"crossattn": torch.randn(4, 5, 8, generator=g), "vector": torch.randn(4, 6, generator=g)}
    u_rows = {"crossattn": torch.randn(4, 5, 8, generator=g), "vector": torch.randn(4, 6, generator=g)}
    bench.texts["base"] = schedules_of(rows, u_rows, [[(0, 1.0)], [(1, 1.0)]], ends=(1, 1000))
    api = standin_api()
    ff = read_factors(bench.model, bench.lora_patches, {"A.safetensors"}, merge=api.merge_lora_to_weight,
                      original=originals_of(bench.model))
    p = SimpleNamespace(sampler=SimpleNamespace(model_wrap_cfg=SimpleNamespace(step=0, total_steps=4)),
                        comment=lambda text: None)
    gen = standin_generation(AutoLoraSettings(enabled=True, gamma=0.0), p)
    sampling = Sampling(api, gen, p, SimpleNamespace(model=bench.model), ff,
                        {"base_c": bench.texts["base"][0], "base_uc": bench.texts["base"][1]})
    try:
        for step in range(4):
            p.sampler.model_wrap_cfg.step = step
            cond, uncond = bench.entries("lora", step)
            out = standin_sampling_function_inner(bench.model, bench.x, bench.sigma, uncond, cond, 7.0,
                                                  {"sampler_pre_cfg_function": [sampling.pre_cfg_function()]},
                                                  standin_calc_cond_uncond_batch)
            base_c, base_u = bench.entries("base", step)
            want = standin_sampling_function_inner(bench.base_model, bench.x, bench.sigma, base_u, base_c, 7.0, {},
                                                   standin_calc_cond_uncond_batch)
            torch.testing.assert_close(out, want, atol=TOL, rtol=0, msg=f"step {step}")
        assert len(sampling.compiled) == 4, "cond and uncond, compiled once per schedule position"
    finally:
        sampling.close()


def test_the_memory_check_for_one_forward_is_asked_once_per_shape():
    from lib_autolora.hosts.forge.fused import Fusion
    fusion = Fusion(standin_api(), lambda text: None)
    asked = []
    model = SimpleNamespace(memory_required=lambda shape: asked.append(tuple(shape)) or 1)
    apply_model = SimpleNamespace(__self__=model)
    on_gpu = SimpleNamespace(device=SimpleNamespace(type="cuda"), shape=(2, 4, 8, 8))
    for _ in range(3):
        assert fusion._can_fuse(apply_model, on_gpu, {})
    assert asked == [(4, 4, 8, 8)]


def test_doubled_forward_gets_forges_cond_marks_made_once_per_pass():
    """The one forward of both branches carries Forge's cond_mark / indices for the doubled layout
    (what Forge itself would compute for it), built once per pass: Forge builds cond_mark on the CPU
    and copies it to the device, a blocking copy that would otherwise stall every step."""
    bench = Bench()
    api = standin_api()
    ff = read_factors(bench.model, bench.lora_patches, {"A.safetensors"}, merge=api.merge_lora_to_weight,
                      original=originals_of(bench.model))
    settings = AutoLoraSettings(enabled=True, strategy="batched")
    p = SimpleNamespace(sampler=SimpleNamespace(model_wrap_cfg=SimpleNamespace(step=0, total_steps=4)),
                        comment=lambda text: None)
    gen = standin_generation(settings, p)
    record = gen.stats
    sampling = Sampling(api, gen, p, SimpleNamespace(model=bench.model), ff,
                        {"base_c": bench.texts["base"][0], "base_uc": bench.texts["base"][1]})
    options = {"sampler_pre_cfg_function": [sampling.pre_cfg_function()]}
    seen, apply_model = [], bench.model.apply_model

    def recording_apply_model(x, t, transformer_options=None, **c):
        seen.append((x.shape[0], transformer_options))
        return apply_model(x, t, transformer_options=transformer_options, **c)

    bench.model.apply_model = recording_apply_model
    cond, uncond = bench.entries("lora")
    outs = []
    try:
        for step in range(2):
            p.sampler.model_wrap_cfg.step = step
            outs.append(standin_sampling_function_inner(bench.model, bench.x, bench.sigma, uncond, cond, 7.0,
                                                        copy.deepcopy(options), standin_calc_cond_uncond_batch))
    finally:
        sampling.close()
    doubled = [to for rows, to in seen if rows == 4 * bench.x.shape[0]]
    assert len(doubled) == 2 and record.guided_steps == 2, "one fused forward per step"
    both = [0, 1, 0, 1]
    torch.testing.assert_close(doubled[0]["cond_mark"], standin_compute_cond_mark(both, bench.sigma))
    assert (doubled[0]["cond_indices"], doubled[0]["uncond_indices"]) == standin_compute_cond_indices(both, bench.sigma)
    assert doubled[0]["cond_or_uncond"] == both
    assert doubled[1]["cond_mark"] is doubled[0]["cond_mark"], "made once per pass, not per step"
    torch.testing.assert_close(outs[0], outs[1])  # same x and sigma: the cached marks change nothing


def test_base_conditioning_is_reused_only_for_forges_same_conditioning_and_settings():
    """BaseConditioning.cached: Forge's cached conditioning object (the same object, not an equal
    one) and equal AutoLoRA settings give back the earlier base conditioning; anything else
    encodes. Stand-in `encode`: a fresh value per call, as a real encoding would give."""
    from lib_autolora.hosts.forge.conditioning import BaseCondCache, BaseConditioning
    conditioning = BaseConditioning(standin_api(), BaseCondCache())
    encoded = []

    def encode(p, gen, function, prompts, steps, hires_steps):
        value = (object(), None)
        encoded.append(value)
        return value, 7, ("AutoLoRA: 1 text-encoder layer(s) use an exact dense delta",)

    conditioning.encode = encode

    def new_gen(**settings):
        return standin_generation(AutoLoraSettings(enabled=True, **settings))

    forge_cond, forge_uncond = [torch.zeros(1)], [torch.zeros(1)]
    first = new_gen()
    a = conditioning.cached(None, first, forge_cond, None, ["p"], 4, None)
    b = conditioning.cached(None, first, forge_uncond, None, ["n"], 4, None)
    second = new_gen()
    assert conditioning.cached(None, second, forge_cond, None, ["p"], 4, None) is a
    assert conditioning.cached(None, second, forge_uncond, None, ["n"], 4, None) is b
    assert len(encoded) == 2 and second.stats.te_base_cached == 2
    assert second.stats.modules["text_encoder"] == 7 and second.stats.notices, "reuse keeps the record and notice"
    equal_not_same = [torch.zeros(1)]
    assert conditioning.cached(None, new_gen(), equal_not_same, None, ["p"], 4, None) is not a
    assert conditioning.cached(None, new_gen(lora_scale=0.5), forge_cond, None, ["p"], 4, None) is not a
    assert conditioning.cached(None, new_gen(base_text_encoder=False), forge_cond, None, ["p"], 4, None) is not a
    other_lora = new_gen()
    other_lora.host_state.guided_files = {"B.safetensors"}
    assert conditioning.cached(None, other_lora, forge_cond, None, ["p"], 4, None) is not a
    assert len(encoded) == 6 and len(conditioning.cache.entries) == BaseCondCache.SIZE  # bounded


def test_the_forge_binding_needs_forge_mains_sampling_step():
    """Forge main's `sampling_function_inner` (the stand-in above copies its call order) carries
    AutoLoRA; a step without the pre-CFG list or the batch function (ComfyUI's later
    `calc_cond_batch`, as the newest Forge Neo ported it) is named as the reason instead."""
    from lib_autolora.hosts import forge

    def forge_main(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):
        uncond_ = None if math.isclose(cond_scale, 1.0) else uncond
        for fn in model_options.get("sampler_pre_cfg_function", []):
            model, cond, uncond_, x, timestep, model_options = fn(model, cond, uncond_, x, timestep, model_options)
        cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)  # noqa: F821
        if "sampler_cfg_function" in model_options:
            return x - model_options["sampler_cfg_function"]({})
        return uncond_pred + (cond_pred - uncond_pred) * cond_scale

    assert forge.ForgeAPI.missing(SimpleNamespace(sampling_function_inner=forge_main), StandInForgeModelPatcher) is None

    def comfy_style(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):
        out = calc_cond_batch(model, [cond, uncond], x, timestep, model_options)  # noqa: F821
        return cfg_function(model, out[0], out[1], cond_scale, x, timestep, model_options)  # noqa: F821

    reason = forge.ForgeAPI.missing(SimpleNamespace(sampling_function_inner=comfy_style), StandInForgeModelPatcher)
    assert "sampler_pre_cfg_function" in reason and "calc_cond_uncond_batch" in reason


def _delta_outputs(ff, seed=4):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module, delta in ff.factors.deltas.items():
        w = module.weight
        x = torch.randn(3, *w.shape[1:2], *((6, 6) if w.ndim == 4 else ()), generator=g)
        out[ff.factors.names[module]] = delta.forward(x)
    return out


def test_weight_adapter_patches_give_the_same_factors_as_forge_mains_tuples():
    """Forge Neo 2.x keeps each LoRA patch as a ComfyUI weight adapter in a 6-tuple (with the online
    flag), merged by its in-place merge: the factors read from them are Forge main's."""
    from standins.forge_neo2 import StandInLoRAAdapter, standin_merge_lora_to_weight as neo_merge
    bench = Bench()
    want = _delta_outputs(read_factors(bench.model, bench.lora_patches, {"A.safetensors"},
                                       merge=standin_merge_lora_to_weight, original=originals_of(bench.model)))

    def adapter_entry(entry):
        strength, (_kind, (up, down, alpha, mid, dora)), strength_model, offset, function = entry
        return strength, StandInLoRAAdapter(set(), (up, down, float(alpha), mid, dora, None)), strength_model, \
            offset, function, False

    neo = {identity: {k: [adapter_entry(e) for e in entries] for k, entries in patches.items()}
           for identity, patches in bench.lora_patches.items()}
    got = _delta_outputs(read_factors(bench.model, neo, {"A.safetensors"}, merge=neo_merge,
                                      original=originals_of(bench.model)))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("host", ["forge main", "neo 2.26", "neo 2.29"])
def test_our_text_encodings_leave_no_infotext_on_forge_main_nor_on_later_neo(monkeypatch, host):
    """The text engines leave Emphasis/TI notes for get_conds_with_caching in a module global of
    classic_engine (Forge main and Neo's October tree, whose `dynamic_args` is a dict) or in
    `dynamic_args.last_extra_generation_params` (Neo 2.x, a class attribute that processing.py
    clears in place; 2.29 renamed classic_engine to sd_engine); AutoLoRA's encodings put back what
    was there."""
    import sys
    import types
    from contextlib import nullcontext

    from lib_autolora.hosts.forge import ForgeAPI

    args = types.ModuleType("backend.args")
    text_processing = types.ModuleType("backend.text_processing")
    modules = {"backend": types.ModuleType("backend"), "backend.text_processing": text_processing,
               "backend.args": args, "modules": types.ModuleType("modules"),
               "modules.devices": types.ModuleType("modules.devices")}
    if host == "forge main":
        args.dynamic_args = dict(embedding_dir="./embeddings", emphasis_name="original")
        engine = modules["backend.text_processing.classic_engine"] = types.ModuleType("classic_engine")
        engine.last_extra_generation_params = buffer = {"TI": "before"}
        text_processing.classic_engine = engine
    else:
        args.dynamic_args = type("dynamic_args", (), {"last_extra_generation_params": {"TI": "before"}})
        buffer = args.dynamic_args.last_extra_generation_params
        if host == "neo 2.26":
            engine = modules["backend.text_processing.classic_engine"] = types.ModuleType("classic_engine")
            text_processing.classic_engine = engine
        else:  # no classic_engine: importing it fails
            modules["backend.text_processing.classic_engine"] = None
    modules["modules.devices"].autocast = nullcontext
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["backend"].text_processing = text_processing
    sys.modules["modules"].devices = modules["modules.devices"]

    api = object.__new__(ForgeAPI)
    api.options = lambda: SimpleNamespace(CLIP_stop_at_last_layers=1)
    p = SimpleNamespace(sd_model=SimpleNamespace(set_clip_skip=lambda n: None))
    with api.encoding(p):
        buffer["Emphasis"] = "No norm"  # what an encoding of ours would leave
    assert buffer == {"TI": "before"}


@pytest.mark.parametrize("strategy", ["batched", "dual", "sequential", "swap"])
def test_the_controls_identities_through_forge_sampling(strategy):
    """base_strength = the LoRA's own strength: the base branch is the LoRA model, any γ gives the
    plain LoRA image (and its text encoder keeps the LoRA too: base_text_encoder off here, the
    twin's text is the LoRA's); a cap of 0 gives the base image at any γ; any schedule at γ 1 is
    the plain LoRA; the late ramp's first step is the plain LoRA step."""
    bench = Bench()
    lora = bench.plain(bench.model, "lora", 7.0)
    base = bench.plain(bench.base_model, "base", 7.0)
    same = bench.autolora(AutoLoraSettings(enabled=True, gamma=3.0, base_strength=1.0, strategy=strategy,
                                           base_text_encoder=False), 7.0, base_text=False)[0]
    torch.testing.assert_close(same, lora, atol=TOL, rtol=0)
    capped = bench.autolora(AutoLoraSettings(enabled=True, gamma=2.5, cap=0.0, strategy=strategy), 7.0)[0]
    torch.testing.assert_close(capped, base, atol=TOL, rtol=0)
    for schedule in ("early", "late", "middle"):
        g1 = bench.autolora(AutoLoraSettings(enabled=True, gamma=1.0, schedule=schedule, strategy=strategy), 7.0)[0]
        torch.testing.assert_close(g1, lora, atol=TOL, rtol=0)
    first_late = bench.autolora(AutoLoraSettings(enabled=True, gamma=2.0, schedule="late", strategy=strategy), 7.0,
                                step=(0, 4))[0]
    torch.testing.assert_close(first_late, lora, atol=TOL, rtol=0)
    last_late = bench.autolora(AutoLoraSettings(enabled=True, gamma=2.0, schedule="late", strategy=strategy), 7.0,
                               step=(3, 4))[0]
    full = bench.autolora(AutoLoraSettings(enabled=True, gamma=2.0, strategy=strategy), 7.0, step=(3, 4))[0]
    torch.testing.assert_close(last_late, full, atol=TOL, rtol=0)
    half = bench.autolora(AutoLoraSettings(enabled=True, gamma=1.5, base_strength=0.5, strategy=strategy), 7.0,
                          base_text=False)[0]
    assert (half - bench.autolora(AutoLoraSettings(enabled=True, gamma=1.5, strategy=strategy), 7.0,
                                  base_text=False)[0]).abs().max() > 100 * TOL, "a weaker base is another guide"


@pytest.mark.parametrize("strategy", ["batched", "sequential", "swap"])
def test_flux_like_guidance_distilled_model_at_cfg_1(strategy):
    """Forge's Flux: the distilled CFG scale travels in the conditions (`guidance`), the
    generation's CFG is 1, so Forge evaluates no uncond: AutoLoRA is the two-evaluation blend of the
    branches' conditional predictions, and the base twin keeps the guidance. (Chroma, CFG with a T5
    context only, is the `pooled=False` case of the identities above.)"""
    bench = Bench(guidance=3.5)
    lora, base = bench.plain(bench.model, "lora", 1.0), bench.plain(bench.base_model, "base", 1.0)
    assert (lora - Bench(guidance=1.0).plain(bench.model, "lora", 1.0)).abs().max() > 1e-3, "guidance reaches the model"
    for gamma, want in ((1.0, lora), (0.0, base)):
        out, record, _ = bench.autolora(AutoLoraSettings(enabled=True, gamma=gamma, strategy=strategy), 1.0)
        torch.testing.assert_close(out, want, atol=TOL, rtol=0)
        assert record.guided_steps == 1 and record.base_calls >= 1
    out = bench.autolora(AutoLoraSettings(enabled=True, gamma=1.5, w1=5.0, w2=9.0, strategy=strategy), 1.0)[0]
    torch.testing.assert_close(out, base + (lora - base) * 1.5, atol=1e-4, rtol=0)
