"""LoRA factors and the kohya reader: each term reproduces exactly what merging it does."""
import pytest
import torch
import torch.utils._python_dispatch

from helpers import lora_state_dict, make_model
from lib_autolora.factors import DenseTerm, LowRankTerm, ModuleDelta
from demo.kohya import LoraMismatchError, factors_from_kohya


def _check_module_delta(module, delta, x, atol=1e-5):
    """delta.forward(x) must equal module_with_merged_weight(x) - module(x)."""
    plain = module(x)
    merged = type(module).__new__(type(module))
    merged.__dict__ = {**module.__dict__, "_parameters": dict(module._parameters)}
    merged._parameters["weight"] = torch.nn.Parameter(module.weight + delta.delta_weight().to(module.weight.dtype))
    if delta.delta_bias() is not None:
        merged._parameters["bias"] = torch.nn.Parameter(module.bias + delta.delta_bias())
    torch.testing.assert_close(delta.forward(x), merged(x) - plain, atol=atol, rtol=1e-4)
    assert (merged(x) - plain).abs().max() > 10 * atol  # the delta is not negligible


def test_linear_low_rank_and_fused_terms():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 24)
    d = ModuleDelta.for_module(lin)
    d.add(LowRankTerm(torch.randn(4, 16), torch.randn(24, 4), scale=0.5))
    d.add(LowRankTerm(torch.randn(2, 16), torch.randn(24, 2), scale=-1.25))  # a second LoRA
    _check_module_delta(lin, d, torch.randn(3, 5, 16))
    d.prepare(torch.device("cpu"), torch.float32)
    assert len(d._prepared[2]) == 1  # both terms fused into one down/up pair


class _AtenCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the dispatcher calls made under it: the per-layer work that a launch-bound step pays."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _two_lora_linear(seed=0):
    torch.manual_seed(seed)
    d = ModuleDelta.for_module(torch.nn.Linear(16, 24))
    d.add(LowRankTerm(torch.randn(4, 16), torch.randn(24, 4), scale=0.5))
    d.add(LowRankTerm(torch.randn(2, 16), torch.randn(24, 2), scale=-1.25))
    return d


def test_add_into_accumulates_the_term_in_place_with_fewer_dispatcher_calls():
    d = _two_lora_linear()
    x, out = torch.randn(3, 5, 16), torch.randn(3, 5, 24)
    expected = out + 0.7 * d.forward(x)
    target = out.clone()
    d.add_into(target, x, 0.7)
    torch.testing.assert_close(target, expected, atol=1e-5, rtol=1e-5)
    # The down projection a sibling layer computed serves as well.
    target = out.clone()
    d.add_into(target, x, 0.7, down_out=x.reshape(-1, 16) @ d._prepared[2][0][0].T)
    torch.testing.assert_close(target, expected, atol=1e-5, rtol=1e-5)
    # mm + addmm_ into `out` instead of linear, linear, add_.
    with _AtenCalls() as fast:
        d.add_into(out.clone(), x, 0.7)
    with _AtenCalls() as plain:
        out.clone().add_(d.forward(x), alpha=0.7)
    assert fast.calls < plain.calls


def test_add_into_falls_back_for_strided_outputs_other_dtypes_and_dense_terms():
    d = _two_lora_linear()
    x = torch.randn(5, 16)
    strided = torch.randn(24, 5).T  # a host layer that returns a transposed view
    expected = strided + d.forward(x)
    d.add_into(strided, x, 1.0)
    torch.testing.assert_close(strided, expected, atol=1e-5, rtol=1e-5)
    out64 = torch.randn(5, 24, dtype=torch.float64)  # a layer whose output dtype is not its input's
    expected = out64 + d.forward(x).double()
    d.add_into(out64, x, 1.0)
    torch.testing.assert_close(out64, expected, atol=1e-5, rtol=1e-5)
    d.add(DenseTerm(torch.randn(24, 16)))  # no longer one low-rank term: the general path
    assert d.low_rank_pair(x.device, x.dtype) is None
    out = torch.randn(5, 24)
    expected = out - d.forward(x)
    d.add_into(out, x, -1.0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_conv_locon(kernel, stride, padding):
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(8, 12, kernel, stride=stride, padding=padding)
    d = ModuleDelta.for_module(conv)
    d.add(LowRankTerm(torch.randn(4, 8, kernel, kernel), torch.randn(12, 4, 1, 1), scale=0.3))
    _check_module_delta(conv, d, torch.randn(2, 8, 9, 9), atol=1e-4)


def test_conv_locon_tucker_mid():
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(8, 12, 3, padding=1)
    d = ModuleDelta.for_module(conv)
    d.add(LowRankTerm(torch.randn(4, 8, 1, 1), torch.randn(12, 4, 1, 1), scale=0.2, mid=torch.randn(4, 4, 3, 3)))
    _check_module_delta(conv, d, torch.randn(2, 8, 7, 7), atol=1e-4)


def test_dense_terms_linear_and_conv():
    torch.manual_seed(3)
    lin, conv = torch.nn.Linear(6, 5), torch.nn.Conv2d(3, 4, 3, padding=1)
    dl, dc = ModuleDelta.for_module(lin), ModuleDelta.for_module(conv)
    dl.add(DenseTerm(torch.randn(5, 6) * 0.3, torch.randn(5) * 0.1))
    dc.add(DenseTerm(torch.randn(4, 3, 3, 3) * 0.3))
    _check_module_delta(lin, dl, torch.randn(2, 6))
    _check_module_delta(conv, dc, torch.randn(2, 3, 6, 6), atol=1e-4)


def test_unsupported_module_type_is_a_clear_error():
    with pytest.raises(TypeError, match="GroupNorm"):
        ModuleDelta.for_module(torch.nn.GroupNorm(2, 4))


def _dense_lycoris_sd(name, module, g):
    out_f, in_f = module.weight.shape
    return {
        f"{name}.hada_w1_a": torch.randn(out_f, 2, generator=g), f"{name}.hada_w1_b": torch.randn(2, in_f, generator=g),
        f"{name}.hada_w2_a": torch.randn(out_f, 2, generator=g), f"{name}.hada_w2_b": torch.randn(2, in_f, generator=g),
        f"{name}.alpha": torch.tensor(1.0),
    }


def test_kohya_reader_matches_merging_for_lora_loha_lokr_full():
    model = make_model(0)
    mods = model.kohya_modules()
    g = torch.Generator().manual_seed(5)
    sd = lora_state_dict(model, seed=3, only=["to_q", "conv_in", "fc1"])
    sd.update(_dense_lycoris_sd("lora_unet_mid_attn_to_k", mods["lora_unet_mid_attn_to_k"][1], g))
    w = mods["lora_unet_mid_attn_to_out"][1].weight
    sd["lora_unet_mid_attn_to_out.lokr_w1"] = torch.randn(2, 4, generator=g)
    sd["lora_unet_mid_attn_to_out.lokr_w2"] = torch.randn(w.shape[0] // 2, w.shape[1] // 4, generator=g)
    sd["lora_unet_time_1.diff"] = torch.randn_like(mods["lora_unet_time_1"][1].weight) * 0.1
    sd["lora_unet_time_1.diff_b"] = torch.randn_like(mods["lora_unet_time_1"][1].bias) * 0.1
    factors = factors_from_kohya(sd, mods, strength=0.7)
    kinds = {factors.names[m]: type(d.terms[0]).__name__ for m, d in factors.deltas.items()}
    assert kinds["mid_attn.to_k"] == "DenseTerm" and kinds["mid_attn.to_out"] == "DenseTerm"
    assert kinds["time_1"] == "DenseTerm" and kinds["mid_attn.to_q"] == "LowRankTerm"
    assert factors.dense_count() == sum(kind == "DenseTerm" for kind in kinds.values()) == 3
    for module, delta in factors.deltas.items():
        if isinstance(module, torch.nn.Linear):
            _check_module_delta(module, delta, torch.randn(2, 3, module.in_features), atol=1e-4)
        else:
            _check_module_delta(module, delta, torch.randn(2, module.in_channels, 8, 8), atol=1e-4)


def test_strength_and_alpha_scale():
    model = make_model(0)
    sd = lora_state_dict(model, rank=4, alpha=2.0, only=["mid_attn_to_q"])
    (module, delta), = factors_from_kohya(sd, model.kohya_modules(), strength=0.5).deltas.items()
    up, down = sd["lora_unet_mid_attn_to_q.lora_up.weight"], sd["lora_unet_mid_attn_to_q.lora_down.weight"]
    expected = up @ down * (2.0 / 4) * 0.5
    torch.testing.assert_close(delta.delta_weight(), expected)


def test_te_and_unet_strengths_are_separate():
    model = make_model(0)
    sd = lora_state_dict(model, only=["fc1", "mid_attn_to_q"])
    f = factors_from_kohya(sd, model.kohya_modules(), strengths={"lora_te": 0.0, "lora_unet": 1.0})
    by_name = {f.names[m]: d for m, d in f.deltas.items()}
    assert by_name["fc1"].is_zero and not by_name["mid_attn.to_q"].is_zero


def test_lora_naming_missing_modules_is_an_error_not_half_applied():
    model = make_model(0)
    sd = lora_state_dict(model, only=["to_q"])
    sd["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"] = torch.zeros(4, 8)
    sd["lora_unet_input_blocks_1_1_proj_in.lora_up.weight"] = torch.zeros(8, 4)
    with pytest.raises(LoraMismatchError, match="input_blocks_1_1_proj_in"):
        factors_from_kohya(sd, model.kohya_modules())
    with pytest.warns(UserWarning, match="lacks"):
        f = factors_from_kohya(sd, model.kohya_modules(), strict=False)
    assert f.unmatched == ["lora_unet_input_blocks_1_1_proj_in"] and len(f) == 2


def test_unsupported_network_type_is_reported():
    model = make_model(0)
    sd = {"lora_unet_mid_attn_to_q.weight": torch.ones(64), "lora_unet_mid_attn_to_q.on_input": torch.tensor(1.0)}
    with pytest.warns(UserWarning, match="IA3"):
        f = factors_from_kohya(sd, model.kohya_modules())
    assert len(f) == 0 and f.skipped[0][0] == "lora_unet_mid_attn_to_q"


def test_reader_reads_safetensors_file(tmp_path):
    from helpers import write_lora
    model = make_model(0)
    path = write_lora(tmp_path / "l.safetensors", lora_state_dict(model))
    f = factors_from_kohya(path, model.kohya_modules())
    assert len(f) == len([1 for n in model.kohya_modules()])
    assert f.deltas  # every Linear and Conv2d of the UNet and text encoder


# -- prepare_deltas: every factor of a generation in one upload ------------------------------------

def _mixed_deltas():
    """A two-LoRA Linear, a LoCon conv, a Tucker conv and a dense Linear, factors in float32."""
    g = torch.Generator().manual_seed(3)
    lin, conv, tucker, dense = ModuleDelta("linear"), ModuleDelta("conv2d", padding=(1, 1)), \
        ModuleDelta("conv2d", padding=(1, 1)), ModuleDelta("linear")
    lin.add(LowRankTerm(torch.randn(4, 16, generator=g), torch.randn(24, 4, generator=g), 0.5))
    lin.add(LowRankTerm(torch.randn(2, 16, generator=g), torch.randn(24, 2, generator=g), 0.25))
    conv.add(LowRankTerm(torch.randn(4, 8, 3, 3, generator=g), torch.randn(12, 4, 1, 1, generator=g), 0.3))
    tucker.add(LowRankTerm(torch.randn(4, 8, 1, 1, generator=g), torch.randn(12, 4, 1, 1, generator=g), 0.2,
                           mid=torch.randn(4, 4, 3, 3, generator=g)))
    dense.add(DenseTerm(torch.randn(5, 6, generator=g), torch.randn(5, generator=g)))
    return [lin, conv, tucker, dense]


def _prepared_tensors(delta):
    _device, _dtype, fused, spatial, dense = delta._prepared
    out = [t for pair in fused for t in pair] + [t for triple in spatial for t in triple]
    return out + ([] if dense is None else [t for t in dense if t is not None])


def test_prepare_deltas_gives_what_prepare_gives_from_one_buffer():
    from lib_autolora.factors import prepare_deltas
    deltas = _mixed_deltas()
    for d in deltas:
        d.prepare(torch.device("cpu"), torch.float16)
    expected = [[t.clone() for t in _prepared_tensors(d)] for d in deltas]
    for d in deltas:
        d.release()
    assert prepare_deltas([(d, torch.device("cpu"), torch.float16) for d in deltas]) == len(deltas)
    storages = set()
    for d, want in zip(deltas, expected):
        got = _prepared_tensors(d)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == torch.float16 and g.shape == w.shape
            assert torch.equal(g, w)  # each piece is its own factor, in order: no mix-up between pieces
            if d._prepared[4] is None:
                storages.add(g.untyped_storage().data_ptr())
    assert len(storages) == 1, "one upload: every low-rank factor is a view of one buffer"
    dense = deltas[3]
    dense.release()
    prepare_deltas([(dense, torch.device("cpu"), torch.float32)])
    assert dense._prepared[4][0] is dense.terms[0].weight, "a layer-sized delta where it is: no copy of it"
    # The per-step paths use the pieces as they used their own tensors.
    lin = deltas[0]
    assert lin.low_rank_pair(torch.device("cpu"), torch.float16) is lin._pair_t is not None
    x = torch.randn(3, 16, dtype=torch.float16)
    reference = (x.float() @ lin.delta_weight().t()).half()
    torch.testing.assert_close(lin.forward(x), reference, atol=2e-2, rtol=1e-2)


def test_prepare_deltas_skips_what_is_ready_and_a_later_call_in_another_dtype_prepares_again():
    from lib_autolora.factors import prepare_deltas
    deltas = _mixed_deltas()
    deltas[0].prepare(torch.device("cpu"), torch.float32)
    ready = deltas[0]._prepared
    assert prepare_deltas([(d, torch.device("cpu"), torch.float32) for d in deltas]) == len(deltas) - 1
    assert deltas[0]._prepared is ready
    x = torch.randn(2, 16, dtype=torch.float64)  # a layer that computes in another dtype than planned
    torch.testing.assert_close(deltas[0].forward(x), x @ deltas[0].delta_weight().double().t(), atol=1e-5, rtol=1e-5)
    assert deltas[0]._prepared[1] == torch.float64  # prepared again, for what the layer saw
