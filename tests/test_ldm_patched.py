"""The Forge binding on reForge and Forge Classic (the `ldm_patched` backend), through stand-ins
copied from their code (tests/standins/ldm_patched.py): the step hook is the conditioning
modifiers, which run before the host drops the uncond; Forge Classic's patches are 3-tuples with
four LoRA factors on patchers that record no parent, so AutoLoRA hooks its patcher in place rather
than a clone (a clone would make Classic merge every LoRA again); reForge samples ComfyUI's way
(the conds first, a pre-CFG list of its own, no cond marks, every condition sized)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from lib_autolora.generation import Generation
from lib_autolora.hosts.forge import ForgeAdapter, ForgeState
from lib_autolora.hosts.forge.api import MODIFIERS, LdmPatchedAPI
from lib_autolora.hosts.forge.factors import read_factors
from lib_autolora.hosts.forge.patcher import UNKNOWN_FILE, clones_share_weights, originals, patch_sets
from lib_autolora.hosts.forge.sampling import Sampling
from lib_autolora.params import AutoLoraSettings
from standins.forge import (
    StandInKModel, schedules_of, standin_api, standin_compile_conditions, standin_compile_weighted_conditions,
    standin_reconstruct_cond_batch, standin_reconstruct_multicond_batch)
from standins.forge_neo2 import (
    StandInComfyModelPatcher, lora_adapter, standin_load_lora_for_models, standin_merge_lora_to_weight)
from standins.ldm_patched import (
    standin_script_callbacks,
    StandInClassicModelPatcher, classic_lora_patch, classic_step, reforge_step, run_modifiers)

CPU = torch.device("cpu")
TOL = 2e-5
FILES = ("A.safetensors", "B.safetensors")


def weights_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _keys(model):
    dm = model.diffusion_model
    return {"diffusion_model.to_k.weight": tuple(dm.to_k.weight.shape), "diffusion_model.vec.weight":
            tuple(dm.vec.weight.shape), "diffusion_model.out.weight": tuple(dm.out.weight.shape),
            "diffusion_model.conv.weight": tuple(dm.conv.weight.shape)}


class HostBench:
    """`<lora:A:1> <lora:B:0.7>` on one of the two hosts' patchers, merged as loading does, and the
    model with B alone for the base branch to equal. Only A is guided on reForge; on Classic, whose
    patches cannot be told apart, both are."""

    def __init__(self, host: str):
        torch.manual_seed(0)
        self.host = host
        self.model = StandInKModel().eval()
        del self.model.lora_loader
        self.clean = copy.deepcopy(self.model)
        self.unet, only_b = self._load(self.model, (FILES[0], FILES[1])), None
        self.guided = {FILES[0]} if host == "reforge" else set(FILES)
        self.base_model = copy.deepcopy(self.clean)
        if host == "reforge":
            only_b = self._load(self.base_model, (FILES[1],))
            only_b.patch_model()
        self.unet.patch_model()
        g = torch.Generator().manual_seed(3)
        self.x, self.sigma = torch.randn(2, 4, 4, 4, generator=g), torch.full((2,), 1.2)
        self.texts = {b: schedules_of(torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g),
                                      [[(0, 1.0)], [(1, 1.0)]]) for b in ("lora", "base")}

    def _load(self, model, files):
        seeds = {FILES[0]: 1, FILES[1]: 20}
        strength = {FILES[0]: 1.0, FILES[1]: 0.7}
        if self.host == "classic":
            patcher = StandInClassicModelPatcher(model, CPU, CPU)
            for f in files:
                clone = patcher.clone()
                clone.add_patches({k: classic_lora_patch(shape, 2, seeds[f] + i) for i, (k, shape)
                                   in enumerate(_keys(model).items())}, strength[f])
                patcher = clone
            return patcher
        patcher = StandInComfyModelPatcher(model, CPU, CPU)
        for f in files:
            adapters = {k: lora_adapter(shape, 2, seeds[f] + i) for i, (k, shape) in enumerate(_keys(model).items())}
            patcher, _ = standin_load_lora_for_models(patcher, None, adapters, None, strength[f], f)
        return patcher

    def entries(self, branch):
        multicond, uncond = self.texts[branch]
        composition, c = standin_reconstruct_multicond_batch(multicond, 0)
        return (standin_compile_weighted_conditions(c, composition),
                standin_compile_conditions(standin_reconstruct_cond_batch(uncond, 0)))

    def step(self, model, cond_scale, options=None, branch="lora", **kw):
        cond, uncond = self.entries(branch)
        run = classic_step if self.host == "classic" else reforge_step
        return run(model, self.x, self.sigma, uncond, cond, cond_scale, options or {}, **kw)

    def api(self):
        api = standin_api()
        api.merge_for = (lambda patcher: (lambda patches, w, key, computation_dtype=None:
                                          patcher.calculate_weight(patches, w, key))) if self.host == "classic" \
            else (lambda patcher: standin_merge_lora_to_weight)
        api.step_hook, api.corrects_last_noise_uncond = MODIFIERS, False
        if self.host == "reforge":
            api.compute_cond_mark = api.compute_cond_indices = None
        return api

    def autolora(self, settings, cond_scale, **kw):
        api = self.api()
        p = SimpleNamespace(sampler=SimpleNamespace(model_wrap_cfg=SimpleNamespace(step=0, total_steps=4)),
                            comment=lambda text: None)
        gen = Generation(settings, "forge")
        gen.host_state, gen.loaded, gen.guided = ForgeState(), FILES, frozenset(self.guided)
        sets = patch_sets(self.unet, FILES)
        guided = read_factors(self.model, sets, self.guided | {UNKNOWN_FILE}, merge=api.merge_for(self.unet),
                              original=originals(self.unet))
        conds = {"base_c": self.texts["base"][0], "base_uc": self.texts["base"][1]}
        sampling = Sampling(api, gen, p, self.unet, guided, conds)
        options = {MODIFIERS: [sampling.step_function(MODIFIERS)]}
        try:
            return self.step(self.model, cond_scale, options, **kw), gen.stats
        finally:
            sampling.close()


@pytest.mark.parametrize("host", ["classic", "reforge"])
@pytest.mark.parametrize("strategy", ["auto", "batched", "dual", "sequential", "swap"])
def test_identities_through_the_hosts_step(host, strategy):
    bench = HostBench(host)
    before = weights_of(bench.model)
    base_model = bench.base_model if host == "reforge" else bench.clean
    for cond_scale in (6.0, 1.0):
        lora, base = bench.step(bench.model, cond_scale), bench.step(base_model, cond_scale, branch="base")
        assert (lora - base).abs().max() > 100 * TOL
        g1, stats = bench.autolora(AutoLoraSettings(enabled=True, gamma=1.0, strategy=strategy), cond_scale)
        assert stats.failure is None and stats.guided_steps == 1, stats.notices
        torch.testing.assert_close(g1, lora, atol=TOL, rtol=0)
        g0, _ = bench.autolora(AutoLoraSettings(enabled=True, gamma=0.0, strategy=strategy), cond_scale)
        torch.testing.assert_close(g0, base, atol=TOL, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in weights_of(bench.model).items())


def test_a_step_whose_uncond_the_host_skips_after_the_modifiers_is_the_two_evaluation_blend():
    """reForge decides NGMS / skip-early-CFG before the modifiers but applies it after them (uncond
    None, CFG scale 1): AutoLoRA learns it in the CFG function and blends the cond predictions."""
    bench = HostBench("reforge")
    lora = bench.step(bench.model, 6.0, skip_uncond=True)
    base = bench.step(bench.base_model, 6.0, branch="base", skip_uncond=True)
    out, stats = bench.autolora(AutoLoraSettings(enabled=True, gamma=1.5), 6.0, skip_uncond=True)
    torch.testing.assert_close(out, base + 1.5 * (lora - base), atol=1e-4, rtol=0)
    assert stats.guided_steps == 1


def test_classic_patches_read_as_forge_mains():
    """3-tuples (strength, ("lora", (up, down, alpha, mid)), strength_model): the factors are the
    terms Classic's own merge adds, and without a parent chain they are one set, guided together."""
    bench = HostBench("classic")
    sets = patch_sets(bench.unet, FILES)
    assert list(sets) == [(UNKNOWN_FILE, 1.0, 1.0, False)] and not clones_share_weights(bench.unet)
    guided = read_factors(bench.model, sets, {UNKNOWN_FILE}, merge=bench.api().merge_for(bench.unet),
                          original=originals(bench.unet))
    assert not guided.dense and not guided.skipped
    for module, delta in guided.factors.deltas.items():
        key = f"{guided.factors.names[module]}.weight"
        want = bench.unet.calculate_weight(bench.unet.patches[key], torch.zeros_like(module.weight), key)
        torch.testing.assert_close(delta.delta_weight(CPU), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("host", ["classic", "reforge"])
def test_the_step_function_goes_on_a_clone_or_in_place_and_comes_off_again(host):
    """reForge (and Forge, Neo) keep the merged weights for a clone: AutoLoRA hooks a clone and puts
    the host's patcher back. Forge Classic would merge every LoRA again for a clone: AutoLoRA hooks
    the host's own patcher and takes its function and memory reservation off after the pass."""
    bench = HostBench(host)
    unet = bench.unet
    unet.model_options = {MODIFIERS: [print]}  # another extension's modifier stays
    p = SimpleNamespace(sd_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=unet)), comment=lambda t: None,
                        sampler=None)
    adapter = ForgeAdapter(bench.api(), register_callbacks=False)
    gen = Generation(AutoLoraSettings(enabled=True), "forge")
    gen.host_state, gen.loaded, gen.guided = ForgeState(), FILES, frozenset(FILES)
    adapter.bind_pass(p, gen, None, None)
    ours = p.sd_model.forge_objects.unet
    assert (ours is unet) == (host == "classic")
    assert len(ours.model_options[MODIFIERS]) == 2 and ours.extra_preserved_memory_during_sampling > 0
    gen.host_state.unbind(p)
    assert p.sd_model.forge_objects.unet is unet and unet.model_options[MODIFIERS] == [print]
    assert unet.extra_preserved_memory_during_sampling == 0


def test_the_capability_check_wants_the_modifiers_and_the_patcher_conventions():
    def step_with_modifiers(self, x):
        for modifier in self.model_options.get("conditioning_modifiers", []):
            pass

    def step_without(self, x):
        pass

    def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):
        out = calc_cond_batch(model, [cond, uncond], x, timestep, model_options)  # noqa: F821
        return model_options["sampler_cfg_function"](out)

    sampler = SimpleNamespace(sampling_function=sampling_function)
    assert LdmPatchedAPI.missing(sampler, StandInClassicModelPatcher, step_with_modifiers) is None
    assert LdmPatchedAPI.missing(sampler, StandInComfyModelPatcher, step_with_modifiers) is None
    assert "conditioning modifiers" in LdmPatchedAPI.missing(sampler, StandInClassicModelPatcher, step_without)
    no_cfg = SimpleNamespace(sampling_function=step_without)
    assert "CFG function" in LdmPatchedAPI.missing(no_cfg, StandInClassicModelPatcher, step_with_modifiers)


def test_the_modifier_passes_the_hosts_conds_through_on_an_unguided_step():
    bench = HostBench("reforge")
    api = bench.api()
    p = SimpleNamespace(sampler=SimpleNamespace(model_wrap_cfg=SimpleNamespace(step=3, total_steps=4)),
                        comment=lambda text: None)
    gen = Generation(AutoLoraSettings(enabled=True, end=0.5), "forge")
    gen.host_state, gen.loaded, gen.guided = ForgeState(), FILES, frozenset({FILES[0]})
    sampling = Sampling(api, gen, p, bench.unet, None, {})
    cond, uncond = bench.entries("lora")
    options = {"x": 1}
    out = run_modifiers(bench.model, bench.x, bench.sigma, uncond, cond, 6.0,
                        {**options, MODIFIERS: [sampling.step_function(MODIFIERS)]})
    assert out[3] is uncond and out[4] is cond and "sampler_cfg_function" not in out[6]
    assert gen.stats.plain_steps == 1


@pytest.mark.parametrize("host", ["reforge", "classic"])
def test_the_adapter_registers_its_step_callback_with_the_hosts_registrar(host, monkeypatch):
    """Forge Classic's script_callbacks registrars take no `name` (a `name=` made the adapter fail
    to load there, so every AutoLoRA request was refused); reForge's name it."""
    import sys
    import types
    callbacks = standin_script_callbacks(host)
    modules = types.ModuleType("modules")
    modules.__path__, modules.script_callbacks = [], callbacks
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.script_callbacks", callbacks)
    adapter = ForgeAdapter(HostBench(host).api(), register_callbacks=True)
    assert callbacks.registered == [(adapter.after_cfg, None if host == "classic" else "autolora")]
