"""Every base-branch strategy gives the never-LoRA'd model's output and leaves the weights untouched.

Tolerances: fp32 atol 2e-4 (the base weights of swap/toggle are W - ΔW rounded once; hooks subtract
in the activation, so both differ from the clean model by float rounding only); fp16 atol 2e-2
relative to outputs of magnitude ~1 (fp16 has 11 bits of mantissa). Each LoRA moves the output
by far more than the tolerance (asserted), so a strategy that fails to remove it fails the test.
"""
import pytest
import torch

from helpers import fingerprint, lora_state_dict, make_model, merged_copy
from lib_autolora.base_branch import STRATEGIES, StrategyUnavailable, BatchLayoutError
from oracles import make as make_strategy
from demo.kohya import factors_from_kohya

TOL = {torch.float32: 2e-4, torch.float16: 2e-2}


def _inputs(dtype, batch=2):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, 1, 8, 8, generator=g).to(dtype)
    sigma = torch.full((batch,), 1.3)
    context = torch.randn(batch, 4, 32, generator=g).to(dtype)
    return x, sigma, context


def _setup(dtype, loras=None, guided=None):
    """clean model, merged model (host state), factors of the guided LoRAs read from the merged model."""
    clean = make_model(0)
    loras = loras or [(lora_state_dict(clean, seed=1), 1.0)]
    merged = merged_copy(0, loras, dtype)
    factors = None
    for sd, strength in (guided or loras):
        factors = factors_from_kohya(sd, merged.kohya_modules(), strength=strength, into=factors)
    return clean.to(dtype), merged, factors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", sorted(STRATEGIES) + ["toggle"])
def test_base_branch_equals_never_lora_model(name, dtype):
    clean, merged, factors = _setup(dtype)
    x, sigma, ctx = _inputs(dtype)
    before = fingerprint(merged)
    want_base = clean.denoiser(x, sigma, ctx)
    want_lora = merged.denoiser(x, sigma, ctx)
    assert (want_lora - want_base).abs().max() > 20 * TOL[dtype]
    with make_strategy(name, factors) as branch:
        lora_out, base_out = branch.evaluate(merged.denoiser, (x, sigma, ctx), (x, sigma, ctx))
        assert branch.base_calls == 1
    torch.testing.assert_close(base_out, want_base, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(lora_out, want_lora, atol=TOL[dtype], rtol=0)
    assert fingerprint(merged) == before
    assert all(not m._forward_hooks for m in merged.modules())


@pytest.mark.parametrize("name", sorted(STRATEGIES) + ["toggle"])
def test_base_branch_under_autocast(name):
    """A1111 samples on a GPU under torch.autocast: a Linear may get a float32 input (after a
    LayerNorm) and return half. The hooks' in-place arithmetic must cope (an in-place addmm_ is
    not autocast and once mixed the dtypes). CPU autocast to bfloat16 is the same mechanism."""
    clean, merged, factors = _setup(torch.float32)
    x, sigma, ctx = _inputs(torch.float32)
    before = fingerprint(merged)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_base = clean.denoiser(x, sigma, ctx).float()
        want_lora = merged.denoiser(x, sigma, ctx).float()
        with make_strategy(name, factors) as branch:
            lora_out, base_out = branch.evaluate(merged.denoiser, (x, sigma, ctx), (x, sigma, ctx))
    tol = 0.05  # bfloat16: 8 bits of mantissa, rounded differently on the two paths
    assert (want_lora - want_base).abs().max() > 8 * tol
    torch.testing.assert_close(base_out.float(), want_base, atol=tol, rtol=0)
    torch.testing.assert_close(lora_out.float(), want_lora, atol=tol, rtol=0)
    assert fingerprint(merged) == before


@pytest.mark.parametrize("name", sorted(STRATEGIES) + ["toggle"])
def test_lora_scale_in_lora_branch(name):
    clean, merged, factors = _setup(torch.float32)
    sd = lora_state_dict(clean, seed=1)
    half = merged_copy(0, [(sd, 0.5)])
    x, sigma, ctx = _inputs(torch.float32)
    with make_strategy(name, factors, lora_scale=0.5) as branch:
        lora_out, base_out = branch.evaluate(merged.denoiser, (x, sigma, ctx), (x, sigma, ctx))
    torch.testing.assert_close(lora_out, half.denoiser(x, sigma, ctx), atol=2e-4, rtol=0)
    torch.testing.assert_close(base_out, clean.denoiser(x, sigma, ctx), atol=2e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(STRATEGIES) + ["toggle"])
def test_two_loras_one_guided(name):
    clean = make_model(0)
    a, b = lora_state_dict(clean, seed=1), lora_state_dict(clean, seed=2, conv=False)
    clean_plus_b = merged_copy(0, [(b, 0.8)])
    _, merged, factors = _setup(torch.float32, loras=[(a, 1.0), (b, 0.8)], guided=[(a, 1.0)])
    x, sigma, ctx = _inputs(torch.float32)
    with make_strategy(name, factors) as branch:
        _, base_out = branch.evaluate(merged.denoiser, (x, sigma, ctx), (x, sigma, ctx))
    # The unguided LoRA stays in both branches.
    torch.testing.assert_close(base_out, clean_plus_b.denoiser(x, sigma, ctx), atol=2e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(STRATEGIES) + ["toggle"])
def test_exception_mid_forward_restores_everything(name):
    _, merged, factors = _setup(torch.float32)
    x, sigma, ctx = _inputs(torch.float32)
    before = fingerprint(merged)

    def failing_forward(*args):
        merged.denoiser.unet.mid_attn.to_q(torch.randn(args[0].shape[0], 16, 64))  # some layers ran ...
        raise RuntimeError("out of memory (simulated)")  # ... then the host failed

    with pytest.raises(RuntimeError, match="simulated"):
        with make_strategy(name, factors) as branch:
            branch.evaluate(failing_forward, (x, sigma, ctx), (x, sigma, ctx))
    assert fingerprint(merged) == before
    assert all(not m._forward_hooks for m in merged.modules())
    assert all("forward" not in m.__dict__ for m in merged.modules())  # dual's shadows are gone
    assert all(type(p) is torch.nn.Parameter for p in merged.parameters())


def test_functional_host_lora_works_with_hooks_and_refuses_swap():
    """A host that adds the LoRA in forward (A1111 lora_functional, Forge online) instead of merging."""
    clean = make_model(0)
    sd = lora_state_dict(clean, seed=1)
    host_factors = factors_from_kohya(sd, clean.kohya_modules())
    handles = [m.register_forward_hook(lambda mod, args, out, d=d: out + d.forward(args[0]))
               for m, d in host_factors.deltas.items()]
    before = fingerprint(clean)
    x, sigma, ctx = _inputs(torch.float32)
    want_lora = merged_copy(0, [(sd, 1.0)]).denoiser(x, sigma, ctx)
    factors = factors_from_kohya(sd, clean.kohya_modules())
    with make_strategy("batched", factors, weights_merged=False) as branch:
        lora_out, base_out = branch.evaluate(clean.denoiser, (x, sigma, ctx), (x, sigma, ctx))
    for h in handles:
        h.remove()
    torch.testing.assert_close(lora_out, want_lora, atol=2e-4, rtol=0)
    torch.testing.assert_close(base_out, clean.denoiser(x, sigma, ctx), atol=2e-4, rtol=0)
    assert fingerprint(clean) == before
    for name in ("swap", "toggle", "dual"):
        with pytest.raises(StrategyUnavailable, match=name):
            make_strategy(name, factors, weights_merged=False)


def test_batched_refuses_a_batch_it_cannot_follow():
    _, merged, factors = _setup(torch.float32)
    x, sigma, ctx = _inputs(torch.float32)

    def chunked(x, sigma, ctx):  # a host that splits the batch in halves behind our back
        return torch.cat([merged.denoiser(x[:2], sigma[:2], ctx[:2]), merged.denoiser(x[2:], sigma[2:], ctx[2:])])

    with pytest.raises(BatchLayoutError, match="expected 4"):
        with make_strategy("batched", factors) as branch:
            branch.evaluate(chunked, (x, sigma, ctx), (x, sigma, ctx))
    assert all(not m._forward_hooks for m in merged.modules())


def test_unknown_strategy_lists_choices():
    with pytest.raises(ValueError, match="batched"):
        make_strategy("fast", None)


def test_text_encoder_base_conditioning():
    clean, merged, factors = _setup(torch.float32)
    labels = torch.tensor([3, 10])
    assert (merged.text_encoder(labels) - clean.text_encoder(labels)).abs().max() > 1e-2
    with make_strategy("sequential", factors) as branch:
        base_ctx = branch.evaluate_base(merged.text_encoder, (labels,))
    torch.testing.assert_close(base_ctx, clean.text_encoder(labels), atol=1e-5, rtol=0)


def test_shared_down_projection_for_qkv_siblings_is_exact():
    """to_q/to_k/to_v of one attention block share a down matmul when they read the same input."""
    from lib_autolora.base_branch.hooks import shared_down_groups

    clean = make_model(0)
    # A self-attention-like case: q, k, v of the tiny model's mid block have in_features 64 / 32 / 32,
    # so k and v (both reading the context) form a group; q stays alone.
    _, merged, factors = _setup(torch.float32)
    groups = shared_down_groups(factors)
    names = {factors.names[m] for m in groups}
    assert {"mid_attn.to_k", "mid_attn.to_v"} <= names and "mid_attn.to_q" not in names
    x, sigma, ctx = _inputs(torch.float32)
    with make_strategy("batched", factors) as branch:
        _, base_out = branch.evaluate(merged.denoiser, (x, sigma, ctx), (x, sigma, ctx))
        assert branch.hooks.shared_hits >= 2  # v reused k's down projection in both attention blocks
    torch.testing.assert_close(base_out, clean.denoiser(x, sigma, ctx), atol=2e-4, rtol=0)


# -- dual: LoRA'd Linears run [LoRA rows; base rows] against [W_lora; W_base] in one bmm ------------

def _linear_and_conv(factors):
    nonzero = factors.nonzero()
    linears = [m for m, d in nonzero.items() if d.kind == "linear"]
    return linears, [m for m in nonzero if m not in linears]


def test_dual_runs_every_linear_without_hooks_and_only_convs_with_hooks():
    clean, merged, factors = _setup(torch.float32)
    linears, convs = _linear_and_conv(factors)
    assert linears and convs, "the tiny model must LoRA both kinds for this test to mean anything"
    x, sigma, ctx = _inputs(torch.float32)
    with make_strategy("dual", factors) as branch:
        lora_out, base_out = branch.evaluate(merged.denoiser, (x, sigma, ctx), (x, sigma, ctx))
        assert branch.dual_modules == len(linears)
        assert branch.hooks.calls == 0  # no Linear took the hook path ...
        assert branch.rest_hooks.calls == len(convs)  # ... and every conv did, once per forward
        assert all("forward" not in m.__dict__ for m in merged.modules()), "shadows removed after the call"
    torch.testing.assert_close(base_out, clean.denoiser(x, sigma, ctx), atol=2e-4, rtol=0)
    torch.testing.assert_close(lora_out, merged.denoiser(x, sigma, ctx), atol=2e-4, rtol=0)


def test_dual_falls_back_to_hooks_for_uneven_branches():
    clean, merged, factors = _setup(torch.float32)
    x, sigma, ctx = _inputs(torch.float32, batch=4)
    uneven = ((x[:3], sigma[:3], ctx[:3]), (x[3:], sigma[3:], ctx[3:]))
    with make_strategy("batched", factors) as batched:
        batched.evaluate(merged.denoiser, *uneven)
    with make_strategy("dual", factors) as branch:
        lora_out, base_out = branch.evaluate(merged.denoiser, *uneven)
        assert branch.hooks.calls == batched.hooks.calls > 0  # the batched hooks did all the work
        assert branch.rest_hooks.calls == 0
    torch.testing.assert_close(base_out, clean.denoiser(x[3:], sigma[3:], ctx[3:]), atol=2e-4, rtol=0)
    torch.testing.assert_close(lora_out, merged.denoiser(x[:3], sigma[:3], ctx[:3]), atol=2e-4, rtol=0)


def test_dual_leaves_layers_the_host_casts_per_call_to_hooks():
    """Forge marks layers whose stored weights are cast at each call (fp8 storage, low VRAM):
    their stored weight is not what the layer computes with, so dual must not stack it."""
    clean, merged, factors = _setup(torch.float32)
    linears, convs = _linear_and_conv(factors)
    cast = linears[0]
    cast.parameters_manual_cast = True
    x, sigma, ctx = _inputs(torch.float32)
    with make_strategy("dual", factors) as branch:
        _, base_out = branch.evaluate(merged.denoiser, (x, sigma, ctx), (x, sigma, ctx))
        assert branch.dual_modules == len(linears) - 1
        assert branch.rest_hooks.calls == len(convs) + 1
    torch.testing.assert_close(base_out, clean.denoiser(x, sigma, ctx), atol=2e-4, rtol=0)


def test_dual_refuses_a_host_that_splits_the_batch():
    _, merged, factors = _setup(torch.float32)
    x, sigma, ctx = _inputs(torch.float32)

    def chunked(x, sigma, ctx):
        return torch.cat([merged.denoiser(x[:2], sigma[:2], ctx[:2]), merged.denoiser(x[2:], sigma[2:], ctx[2:])])

    before = fingerprint(merged)
    with pytest.raises(BatchLayoutError, match="expected 4"):
        with make_strategy("dual", factors) as branch:
            branch.evaluate(chunked, (x, sigma, ctx), (x, sigma, ctx))
    assert fingerprint(merged) == before
    assert all("forward" not in m.__dict__ and not m._forward_hooks for m in merged.modules())


def test_dual_follows_a_host_that_moves_the_input_to_another_device():
    """An offloading host can feed a layer on another device than the one its weights were on when
    the strategy started; dual then computes as the host does and corrects the rows."""
    clean, merged, factors = _setup(torch.float32)
    x, sigma, ctx = _inputs(torch.float32)
    with make_strategy("dual", factors, lora_scale=0.5) as branch:
        # Pretend every stack lives on another device: a bmm against these yields meta tensors, so the
        # values below can only come from the host-forward-and-correct path.
        def meta(t):
            return t.to("meta") if isinstance(t, torch.Tensor) else tuple(w.to("meta") for w in t)

        branch._forwards = {module: branch._make_forward(module, meta(weights), None if biases is None else meta(biases))
                            for module, (weights, biases) in branch._stacks.items()}
        lora_out, base_out = branch.evaluate(merged.denoiser, (x, sigma, ctx), (x, sigma, ctx))
    sd = lora_state_dict(clean, seed=1)
    torch.testing.assert_close(base_out, clean.denoiser(x, sigma, ctx), atol=2e-4, rtol=0)
    torch.testing.assert_close(lora_out, merged_copy(0, [(sd, 0.5)]).denoiser(x, sigma, ctx), atol=2e-4, rtol=0)


# -- what a strategy prepares before the first forward ---------------------------------------------

@pytest.mark.parametrize("name,scale,expect", [
    ("batched", 1.0, "all"), ("sequential", 1.0, "all"), ("swap", 1.0, "none"), ("swap", 0.5, "all"),
    ("toggle", 1.0, "none"), ("dual", 1.0, "convs"), ("dual", 0.5, "convs")])
def test_strategies_upload_the_factors_their_hooks_will_use_before_the_first_forward(name, scale, expect):
    """Factors prepared lazily are copied layer by layer inside the first forward, where on a GPU
    each copy waits for the layer before it; a strategy prepares what it will use up front, for the
    dtype its layers compute in, and nothing it will not use."""
    _clean, merged, factors = _setup(torch.float16)
    linears, convs = _linear_and_conv(factors)
    with make_strategy(name, factors, lora_scale=scale):
        prepared = {m for m, d in factors.nonzero().items() if d.is_prepared_for(m.weight.device, torch.float16)}
        want = {"all": set(linears) | set(convs), "none": set(), "convs": set(convs)}[expect]
        assert prepared == want
    assert all(d._prepared is None for d in factors.deltas.values()), "released after the generation"


def test_dual_reads_the_hosts_weight_for_biased_linears_instead_of_copying_it():
    _clean, merged, factors = _setup(torch.float32)
    with make_strategy("dual", factors) as branch:
        for module, (weights, biases) in branch._stacks.items():
            if biases is None:
                assert weights.shape[0] == 2  # [W_lora; W_base] for one bmm
            else:
                lora_w, _base_w = weights
                assert lora_w.data_ptr() == module.weight.data_ptr(), "no copy of the host's weight"
        assert any(b is not None for _w, b in branch._stacks.values())
    with make_strategy("dual", factors, lora_scale=0.5) as branch:  # another strength: its own weight
        assert all(b is None or w[0].data_ptr() != m.weight.data_ptr() for m, (w, b) in branch._stacks.items())


@pytest.mark.parametrize("name", sorted(STRATEGIES) + ["toggle"])
@pytest.mark.parametrize("base_strength", [0.5, 1.0])
def test_base_strength_keeps_that_share_of_the_guided_lora_in_the_base_branch(name, base_strength):
    """base_strength b: the base branch is the model with the guided LoRA at b times its strength
    (b = 1: the LoRA model itself), for every strategy, the LoRA branch unchanged."""
    clean, merged, factors = _setup(torch.float32)
    sd = lora_state_dict(make_model(0), seed=1)
    at_b = merged_copy(0, [(sd, base_strength)])
    x, sigma, ctx = _inputs(torch.float32)
    before = fingerprint(merged)
    with make_strategy(name, factors, base_strength=base_strength) as branch:
        lora_out, base_out = branch.evaluate(merged.denoiser, (x, sigma, ctx), (x, sigma, ctx))
    torch.testing.assert_close(base_out, at_b.denoiser(x, sigma, ctx), atol=TOL[torch.float32], rtol=0)
    torch.testing.assert_close(lora_out, merged.denoiser(x, sigma, ctx), atol=TOL[torch.float32], rtol=0)
    assert fingerprint(merged) == before
