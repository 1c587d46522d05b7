"""The Forge binding on Forge Neo release 2.x (ComfyUI v0.27's ModelPatcher), through stand-ins of
the 2.26 shapes (tests/standins/forge_neo2.py): LoRAs told apart by the patcher's parent chain,
originals from `ModelPatcher.backup`, a merge that edits the tensor it is given, the 4-argument
prompt function, `join_dicts` model options and the context-window branch. Each test fails on the
binding as it was before Neo 2.x was supported (no `lora_loader` → no original → an error)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from lib_autolora.generation import Generation
from lib_autolora.hosts.forge import ForgeState
from lib_autolora.hosts.forge.api import ForgeAPI, call_prompt_function
from lib_autolora.hosts.forge.factors import read_factors
from lib_autolora.hosts.forge.patcher import (
    UNKNOWN_FILE, guided_sources, missing_convention, originals, patch_sets)
from lib_autolora.hosts.forge.sampling import Sampling
from lib_autolora.params import AutoLoraSettings
from standins.forge import (
    StandInForgeModelPatcher, StandInKModel, standin_api, standin_compile_conditions, standin_sampling_function_inner,
    standin_compile_weighted_conditions, schedules_of, standin_reconstruct_cond_batch,
    standin_reconstruct_multicond_batch)
from standins.forge_neo2 import (
    StandInComfyModelPatcher, StandInComfyModelPatcher229, StandInContextHandler, join_dicts, lora_adapter,
    standin_get_learned_conditioning, standin_load_lora_for_models, standin_merge_lora_to_weight)

CPU = torch.device("cpu")
TOL = 2e-5
FILES = ("A.safetensors", "B.safetensors")


def weights_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def neo_patches(model, dora=False, seed=1):
    """A (guided) and B (kept in both branches) as 2.26's load_lora gives them: adapters keyed by the
    parameter, fused-QKV slices by (key, offset, function)."""
    dm = model.diffusion_model
    d = dm.qkv.weight.shape[1]
    a = {"diffusion_model.to_k.weight": lora_adapter(tuple(dm.to_k.weight.shape), 3, seed),
         ("diffusion_model.qkv.weight", (0, 0, d), None): lora_adapter((d, d), 2, seed + 1),
         ("diffusion_model.qkv.weight", (0, 2 * d, d), None): lora_adapter((d, d), 2, seed + 2),
         "diffusion_model.vec.weight": lora_adapter(tuple(dm.vec.weight.shape), 2, seed + 3),
         "diffusion_model.out.weight": lora_adapter(tuple(dm.out.weight.shape), 2, seed + 4, dora=dora),
         "diffusion_model.conv.weight": lora_adapter(tuple(dm.conv.weight.shape), 2, seed + 5)}
    b = {"diffusion_model.to_k.weight": lora_adapter(tuple(dm.to_k.weight.shape), 2, seed + 10),
         "diffusion_model.out.weight": lora_adapter(tuple(dm.out.weight.shape), 2, seed + 11)}
    return a, b


HOSTS = ("2.26", "2.29 merged", "2.29 online")


class NeoBench:
    """The UNet patcher chain a Neo release (`host`) builds for `<lora:A:1> <lora:B:0.7>`, merged
    ("offline") by loading or, on 2.29 online, applied by the layers in each forward; and the model
    without A to compare the base branch with."""

    def __init__(self, dora=False, host="2.26"):
        torch.manual_seed(0)
        self.model = StandInKModel().eval()
        del self.model.lora_loader  # 2.x has none
        self.clean = copy.deepcopy(self.model)
        a, b = neo_patches(self.model, dora=dora)
        self.root, unet = self._chain(self.model, host, [(a, 1.0, FILES[0]), (b, 0.7, FILES[1])])
        self.unet = unet
        self.base_model = copy.deepcopy(self.clean)
        self._chain(self.base_model, host, [(neo_patches(self.base_model, dora=dora)[1], 0.7, FILES[1])])
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(2, 4, 4, 4, generator=g)
        self.sigma = torch.full((2,), 1.2)
        self.texts = {b: schedules_of(torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g),
                                      [[(0, 1.0)], [(1, 1.0)]]) for b in ("lora", "base")}

    @staticmethod
    def _chain(model, host, loras):
        """(root patcher, the one sampled with) after the host loaded `loras` [(patches, strength, file)]."""
        online = host == "2.29 online"
        root = (StandInComfyModelPatcher if host == "2.26" else StandInComfyModelPatcher229)(model, CPU, CPU)
        unet = root
        for patches, strength, filename in loras:
            unet, _ = standin_load_lora_for_models(unet, None, patches, None, strength, filename, online_mode=online)
        if online:
            unet.load_weight_functions()
        else:
            unet.patch_model()
        return root, unet

    def entries(self, branch):
        multicond, uncond = self.texts[branch]
        composition, c = standin_reconstruct_multicond_batch(multicond, 0)
        return (standin_compile_weighted_conditions(c, composition),
                standin_compile_conditions(standin_reconstruct_cond_batch(uncond, 0)))

    def factors(self, guided=(FILES[0],)):
        sets = patch_sets(self.unet, FILES)
        sources = guided_sources(sets, set(guided), set(FILES))
        return read_factors(self.model, sets, sources, merge=standin_merge_lora_to_weight, original=originals(self.unet))

    def plain(self, model, branch, cond_scale, options=None):
        cond, uncond = self.entries(branch)
        return standin_sampling_function_inner(model, self.x, self.sigma, uncond, cond, cond_scale, options or {})

    def autolora(self, settings, cond_scale, sampler_options=None, context_handler=None):
        api = standin_api()
        api.merge_lora_to_weight = standin_merge_lora_to_weight
        api.merge_for = lambda patcher: standin_merge_lora_to_weight
        api.context_handler = lambda: context_handler
        p = SimpleNamespace(sampler=SimpleNamespace(model_wrap_cfg=SimpleNamespace(step=0, total_steps=4)),
                            comment=lambda text: None)
        gen = Generation(settings, "forge")
        gen.host_state = ForgeState()
        gen.loaded, gen.guided = FILES, frozenset({FILES[0]})
        conds = {"base_c": self.texts["base"][0], "base_uc": self.texts["base"][1]}
        unet = self.unet.clone()
        sampling = Sampling(api, gen, p, unet, self.factors(), conds)
        unet.model_options["sampler_pre_cfg_function"] = [sampling.pre_cfg_function()]
        options = join_dicts(unet.model_options, sampler_options)
        cond, uncond = self.entries("lora")
        try:
            out = standin_sampling_function_inner(self.model, self.x, self.sigma, uncond, cond, cond_scale, options,
                                                  context_handler=context_handler)
        finally:
            sampling.close()
        return out, gen.stats


def test_the_parent_chain_tells_the_loras_apart():
    bench = NeoBench()
    sets = patch_sets(bench.unet, FILES)
    assert [identity[0] for identity in sets] == list(FILES)
    assert set(sets[(FILES[1], 0.7, 1.0, False)]) == {"diffusion_model.to_k.weight", "diffusion_model.out.weight"}
    assert guided_sources(sets, {FILES[0]}, set(FILES)) == {FILES[0]}
    # A clone made after the LoRAs (another extension's) adds nothing and changes nothing.
    assert patch_sets(bench.unet.clone(), FILES).keys() == sets.keys()
    # A LoRA the chain does not show (one patched only the text encoder): the files cannot be told
    # apart, so every LoRA patch is one set, guided only when every LoRA is.
    untold = patch_sets(bench.unet, FILES + ("C.safetensors",))
    assert list(untold) == [(UNKNOWN_FILE, 1.0, 1.0, False)]
    assert guided_sources(untold, {FILES[0]}, set(FILES) | {"C.safetensors"}) is None


def test_online_loras_are_told_apart_by_their_weight_wrappers():
    """2.29 keeps an online LoRA out of `patches`: one wrapper per weight names its file. The sets
    come from the wrappers (any LoRA may be guided alone); another extension's wrapper is no LoRA."""
    bench = NeoBench(host="2.29 online")
    assert not bench.unet.patches
    to_k = "diffusion_model.to_k.weight"
    bench.unet.add_weight_wrapper(to_k, lambda weight: weight)  # e.g. another extension's
    sets = patch_sets(bench.unet, FILES)
    assert list(sets) == [(FILES[0], 1.0, 1.0, True), (FILES[1], 0.7, 1.0, True)]
    assert set(sets[(FILES[1], 0.7, 1.0, True)]) == {to_k, "diffusion_model.out.weight"}
    assert all(len(entry) == 5 for patches in sets.values() for entries in patches.values() for entry in entries)
    assert guided_sources(sets, {FILES[0]}, set(FILES)) == {FILES[0]}
    ff = bench.factors()
    assert ff.online and ff.files == {FILES[0]} and not ff.skipped


def test_factors_of_the_guided_lora_only():
    bench = NeoBench()
    ff = bench.factors()
    assert ff.files == {FILES[0]} and not ff.skipped
    x = torch.randn(3, bench.model.diffusion_model.to_k.weight.shape[1])
    module = bench.model.diffusion_model.to_k
    up, down, alpha = lora_adapter(tuple(module.weight.shape), 3, 1).weights[:3]
    torch.testing.assert_close(ff.factors.deltas[module].forward(x), x @ (up @ down).T * (alpha / 3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("strategy", ["auto", "batched", "dual", "sequential", "swap"])
def test_identities_through_neo2_sampling(strategy, host):
    bench = NeoBench(host=host)
    before = weights_of(bench.model)
    backup_before = {k: v.weight.clone() for k, v in bench.unet.backup.items()}
    lora, base = bench.plain(bench.model, "lora", 6.0), bench.plain(bench.base_model, "base", 6.0)
    assert (lora - base).abs().max() > 100 * TOL
    g1, stats = bench.autolora(AutoLoraSettings(enabled=True, gamma=1.0, strategy=strategy), 6.0)
    assert stats.failure is None and stats.guided_steps == 1
    torch.testing.assert_close(g1, lora, atol=TOL, rtol=0)
    g0, _ = bench.autolora(AutoLoraSettings(enabled=True, gamma=0.0, strategy=strategy), 6.0)
    torch.testing.assert_close(g0, base, atol=TOL, rtol=0)
    after = weights_of(bench.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(backup_before[k], v.weight) for k, v in bench.unet.backup.items())


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("strategy", ["batched", "dual", "swap"])
def test_an_in_place_merge_never_touches_a_live_or_backed_up_weight(strategy, host):
    """DoRA (non-additive) makes the binding merge the patches itself: 2.x's merge writes into the
    tensor it is given, so it must be handed copies. The loaded weights and the originals in the
    backup stay bit-identical, and unpatching gives back the checkpoint."""
    bench = NeoBench(dora=True, host=host)
    clean = weights_of(bench.clean)
    before = weights_of(bench.model)
    backup_before = {k: v.weight.clone() for k, v in bench.unet.backup.items()}
    lora, base = bench.plain(bench.model, "lora", 6.0), bench.plain(bench.base_model, "base", 6.0)
    ff = bench.factors()
    assert "diffusion_model.out.weight" in ff.dense
    g1, stats = bench.autolora(AutoLoraSettings(enabled=True, gamma=1.0, strategy=strategy), 6.0)
    g0, _ = bench.autolora(AutoLoraSettings(enabled=True, gamma=0.0, strategy=strategy), 6.0)
    torch.testing.assert_close(g1, lora, atol=TOL, rtol=0)
    torch.testing.assert_close(g0, base, atol=1e-4, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in weights_of(bench.model).items())
    assert all(torch.equal(backup_before[k], v.weight) for k, v in bench.unet.backup.items())
    bench.unet.unpatch_model()
    assert all(torch.equal(clean[k], v) for k, v in weights_of(bench.model).items())


def test_sampler_model_options_joined_as_neo2_joins_them():
    """2.26 merges the sampler's model options into the patcher's with join_dicts (lists
    concatenated): a CFG++ sampler's post-CFG function joins the model's own, and AutoLoRA hands
    the sampler's the sampled model's predictions (γ 0: the base model's uncond)."""
    bench = NeoBench()
    seen = {}

    def cfg_pp(args):
        seen["uncond"] = args["uncond_denoised"]
        return args["denoised"]

    bench.autolora(AutoLoraSettings(enabled=True, gamma=0.0), 6.0, {"sampler_post_cfg_function": [cfg_pp]})
    torch.testing.assert_close(seen["uncond"], bench.plain(bench.base_model, "base", 0.0), atol=TOL, rtol=0)


def test_the_base_branch_runs_through_the_context_windows():
    bench = NeoBench()
    handler = StandInContextHandler()
    base = bench.plain(bench.base_model, "base", 6.0)
    g0, stats = bench.autolora(AutoLoraSettings(enabled=True, gamma=0.0, strategy="batched"), 6.0,
                               context_handler=handler)
    torch.testing.assert_close(g0, base, atol=TOL, rtol=0)
    assert len(handler.calls) == 2, "the LoRA branch and the base branch, each through the windows"


def test_an_error_inside_sampling_gives_the_plain_step_and_says_so():
    """2.26 before this fix: no original weight for dual/swap → RuntimeError → HTTP 500. Now an
    error inside the step gives the host's plain step, the stats name it, weights are untouched."""
    bench = NeoBench()
    bench.unet.backup.clear()  # as if the host kept its originals somewhere the binding cannot read
    before = weights_of(bench.model)
    lora = bench.plain(bench.model, "lora", 6.0)
    out, stats = bench.autolora(AutoLoraSettings(enabled=True, gamma=1.5, strategy="swap"), 6.0)
    torch.testing.assert_close(out, lora, atol=0, rtol=0)
    assert "no original weight" in stats.failure and not stats.active and stats.guided_steps == 0
    assert any("AutoLoRA failed at step 1" in n for n in stats.notices)
    assert all(torch.equal(before[k], v) for k, v in weights_of(bench.model).items())
    assert not any(m._forward_hooks for m in bench.model.modules())


def test_the_prompt_function_is_called_as_the_host_calls_it():
    """Forge main's prompt functions take `use_old_scheduling` (the option) as a fifth argument;
    2.26's take four and it has no such option."""
    calls = []
    model = SimpleNamespace(encode=lambda *a: calls.append(a) or "c")
    opts = SimpleNamespace()  # 2.26: no use_old_scheduling option at all
    assert call_prompt_function(standin_get_learned_conditioning, opts, model, ["p"], 4, None) == "c"
    assert calls == [(["p"], 4, None)]

    def forge_main(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
        calls.append(use_old_scheduling)

    call_prompt_function(forge_main, SimpleNamespace(use_old_scheduling=True), model, ["p"], 4, None)
    assert calls[-1] is True


def test_the_capability_check_reads_the_patcher_conventions():
    assert missing_convention(StandInComfyModelPatcher) is None
    assert missing_convention(StandInForgeModelPatcher) is None

    class Moved(StandInComfyModelPatcher):  # a release that renames the backup
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.weight_backup = self.__dict__.pop("backup")

    assert "ModelPatcher" in missing_convention(Moved)

    def sampling_step(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):
        for fn in model_options.get("sampler_pre_cfg_function", []):
            pass
        calc_cond_uncond_batch(model, cond, uncond, x, timestep, model_options)  # noqa: F821
        return model_options["sampler_cfg_function"]

    sampling = SimpleNamespace(sampling_function_inner=sampling_step)
    assert ForgeAPI.missing(sampling, StandInComfyModelPatcher) is None
    assert "ModelPatcher" in ForgeAPI.missing(sampling, Moved)



def test_a_lora_named_twice_is_removed_twice():
    """`<lora:A:1> <lora:A:1>`: the host loads A twice (two links of the chain, one file): the
    base branch must take out both copies, not the last one alone."""
    torch.manual_seed(0)
    model = StandInKModel().eval()
    a, _ = neo_patches(model)
    root = StandInComfyModelPatcher(model, CPU, CPU)
    once, _ = standin_load_lora_for_models(root, None, a, None, 1.0, FILES[0])
    twice, _ = standin_load_lora_for_models(once, None, a, None, 1.0, FILES[0])
    sets = patch_sets(twice, (FILES[0], FILES[0]))
    assert list(sets) == [(FILES[0], 1.0, 1.0, False)]
    single = read_factors(model, patch_sets(once, (FILES[0],)), {FILES[0]}, merge=standin_merge_lora_to_weight)
    double = read_factors(model, sets, {FILES[0]}, merge=standin_merge_lora_to_weight)
    module = model.diffusion_model.to_k
    torch.testing.assert_close(double.factors.deltas[module].delta_weight(CPU),
                               2 * single.factors.deltas[module].delta_weight(CPU), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind, shape", [("loha", (24, 16)), ("loha", (12, 8, 3, 3)), ("lokr", (24, 16)),
                                         ("lokr", (24, 16, 3, 3)), ("lokr-w1-factored", (24, 16))])
def test_loha_and_lokr_are_read_as_the_exact_low_rank_terms_they_are(kind, shape):
    """A LoHa (Hadamard product of two low-rank matrices) and a LoKr with a factorised W2 (Kronecker
    product) are low-rank, of rank r1·r2 and cols(W1)·r: read as such they cost what a LoRA costs,
    instead of a dense delta as large as the layer, and equal what the host's merge adds."""
    from standins.forge_neo2 import StandInLoHaAdapter, StandInLoKrAdapter
    g = torch.Generator().manual_seed(7)

    def r(*s):
        return torch.randn(*s, generator=g) * 0.3

    flat_in = int(torch.tensor(shape[1:]).prod())
    if kind == "loha":
        adapter = StandInLoHaAdapter((r(shape[0], 3), r(3, flat_in), 2.0, r(shape[0], 2), r(2, flat_in), None, None, None))
    elif kind == "lokr":  # W1 4×2, W2 = A·B (6×3)(3×8·k·k): a 24×16 Linear, or a 3×3 convolution
        adapter = StandInLoKrAdapter((r(4, 2), None, 3.0, None, None, r(6, 3), r(3, flat_in // 2), None, None))
    else:
        adapter = StandInLoKrAdapter((None, None, 3.0, r(4, 2), r(2, 2), r(6, 3), r(3, 8), None, None))
    module = torch.nn.Linear(shape[1], shape[0]) if len(shape) == 2 else torch.nn.Conv2d(shape[1], shape[0], 3, padding=1)
    model = torch.nn.Sequential(module)
    patches = {("X.safetensors", 0.8, 1.0, False): {"0.weight": [(0.8, adapter, 1.0, None, None, False)]}}
    ff = read_factors(model, patches, {"X.safetensors"}, merge=standin_merge_lora_to_weight)
    assert not ff.dense, "low-rank, not a layer-sized dense delta"
    want = standin_merge_lora_to_weight(patches[("X.safetensors", 0.8, 1.0, False)]["0.weight"],
                                        torch.zeros(shape), "0.weight")
    torch.testing.assert_close(ff.factors.deltas[module].delta_weight(CPU), want, atol=1e-5, rtol=1e-5)
