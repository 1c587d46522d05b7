"""The e2e suite's model makers that run without a WebUI: the streamed safetensors writer, the
network-type LoRA maker, and how the suite runs a maker."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

MAKER = Path(__file__).resolve().parent / "e2e" / "makers" / "streamed_checkpoint.py"


def load_maker(path: Path):
    """A maker script as a module (the makers are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def streamed():
    return load_maker(MAKER)


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.out.2.weight": torch.randn(4, 320, 3, 3, generator=g).half(),
        "conditioner.embedders.1.model.logit_scale": torch.tensor(4.6052, dtype=torch.float16),  # 0-dim
        "lora_unet_x.alpha": torch.tensor(4.0, dtype=torch.float16),
        "bf16.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "betas": torch.linspace(0.00085, 0.012, 10, dtype=torch.float32),
        "position_ids": torch.arange(77, dtype=torch.int64)[None],
        "a.transposed": torch.randn(6, 4, generator=g).t(),  # not contiguous
        "t5xxl.fp8.weight": torch.randn(4, 8, generator=g).to(torch.float8_e4m3fn),
    }


def test_streamed_file_loads_as_the_same_tensors(streamed, tmp_path):
    source = tensors()
    path = tmp_path / "x.safetensors"
    streamed.save_streamed(source, str(path), {"note": "random weights", "format": "pt"})
    loaded = safetensors_torch.load_file(str(path))
    assert sorted(loaded) == sorted(source)
    for key, tensor in source.items():
        assert loaded[key].dtype == tensor.dtype and loaded[key].shape == tensor.shape, key
        assert torch.equal(loaded[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), key
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"note": "random weights", "format": "pt"}


def test_streamed_file_is_byte_reproducible_and_header_aligned(streamed, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    source = tensors()
    streamed.save_streamed(source, str(a), {"z": "1", "a": "2"})
    streamed.save_streamed(dict(reversed(list(source.items()))), str(b), {"a": "2", "z": "1"})
    assert a.read_bytes() == b.read_bytes()
    header_length = int.from_bytes(a.read_bytes()[:8], "little")
    assert header_length % 8 == 0
    data_bytes = sum(t.numel() * t.element_size() for t in source.values())
    assert a.stat().st_size == 8 + header_length + data_bytes


# -- the network-type LoRA maker (tests/e2e/makers/network_types.py) --------------------------------------

NETWORK_TYPES = MAKER.parent / "network_types.py"


@pytest.fixture(scope="module")
def network_types():
    return load_maker(NETWORK_TYPES)


def test_network_type_maker_enumerates_sd15_layers(network_types):
    """SD1.5's layers as kohya names them: each once; the UNet's attention blocks (16 of them, 12
    layers each), with convs also its 22 resnets and 6 resamplers; the text encoder's 12 x 6 Linears;
    shapes where the channel bookkeeping of the up path (skip connections) shows."""
    attention, every = network_types.targets(False), network_types.targets(True)
    for mods in (attention, every):
        names = [name for name, *_ in mods]
        assert len(names) == len(set(names))
    resnet_layers = sum(1 for _, path, _, _ in every if ".resnets." in path)
    assert sum(1 for m in attention if m[3] == "unet") == 16 * 12  # proj_in/out, 2 x 4 attention, 2 ff
    assert sum(1 for m in attention if m[3] == "te") == 12 * 6
    # conv1, time_emb_proj, conv2 in each of 22 resnets; a conv_shortcut where channels change: the
    # first resnet of down blocks 1 and 2, and every resnet of the up path (its input carries a skip)
    assert resnet_layers == 22 * 3 + 2 + 12
    assert sum(1 for _, path, _, _ in every if "samplers." in path) == 6
    shapes = {path: shape for _, path, shape, _ in every}
    assert shapes["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] == (320, 768, ())
    assert shapes["down_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj"] == (5120, 640, ())
    assert shapes["up_blocks.0.resnets.0.conv1"] == (1280, 2560, (3, 3))
    assert shapes["up_blocks.1.resnets.2.conv1"] == (1280, 1920, (3, 3))
    assert shapes["up_blocks.3.resnets.0.conv_shortcut"] == (320, 960, (1, 1))
    assert shapes["up_blocks.3.resnets.2.conv_shortcut"] == (320, 640, (1, 1))
    assert shapes["text_model.encoder.layers.11.mlp.fc1"] == (3072, 768, ())


def test_network_type_maker_matches_the_diffusers_classes(network_types):
    """Where diffusers and transformers are installed: the same layers, in the same order, as
    UNet2DConditionModel and CLIPTextModel built from the configs give (the maker's earlier source)."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**network_types.SD15_UNET)
        te = transformers.CLIPTextModel(transformers.CLIPTextConfig(**network_types.SD15_TEXT_ENCODER))
    want = []
    for name, block in unet.named_modules():
        if type(block).__name__ in ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"):
            for sub, layer in block.named_modules():
                if isinstance(layer, torch.nn.Linear):
                    want.append((f"{name}.{sub}", (layer.out_features, layer.in_features, ())))
                elif isinstance(layer, torch.nn.Conv2d):
                    want.append((f"{name}.{sub}", (layer.out_channels, layer.in_channels, tuple(layer.kernel_size))))
    want += [(name, (layer.out_features, layer.in_features, ())) for name, layer in te.named_modules()
             if (".self_attn." in name or ".mlp." in name) and isinstance(layer, torch.nn.Linear)]
    assert [(path, shape) for _, path, shape, _ in network_types.targets(True)] == want


def test_network_type_file_is_reproducible_and_counts_its_modules(network_types, tmp_path):
    paths = [tmp_path / "a" / "lora.safetensors", tmp_path / "b" / "lora.safetensors"]
    for path in paths:
        path.parent.mkdir()
        assert network_types.main(["--type", "loha", "--out", str(path), "--seed", "3"]) == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()
    from safetensors import safe_open
    with safe_open(str(paths[0]), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    mods = network_types.targets(True)
    assert meta["autolora_e2e_unet_modules"] == str(sum(1 for m in mods if m[3] == "unet"))
    assert meta["autolora_e2e_te_modules"] == str(sum(1 for m in mods if m[3] == "te"))
    assert keys == {f"{name}.{tensor}" for name, *_ in mods
                    for tensor in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")}


# A maker as the suite runs them: its output path on the command line; this one writes the name it
# was given, then exits with the code in its second argument.
FAKE_MAKER = "import sys\nopen(sys.argv[1], 'w').write(sys.argv[1].rsplit('/', 1)[-1])\nsys.exit(int(sys.argv[2]))\n"


@pytest.mark.parametrize("exit_code", [0, 1])
def test_the_suite_keeps_a_model_file_only_when_its_maker_finished(tmp_path, exit_code):
    hosts = load_maker(MAKER.parent.parent / "hosts.py")
    maker = tmp_path / "maker.py"
    maker.write_text(FAKE_MAKER)
    out = tmp_path / "models" / "Lora" / "autolora-e2e" / "rand_lora.safetensors"
    argv = [sys.executable, str(maker), str(out), str(exit_code)]
    if exit_code:
        with pytest.raises(subprocess.CalledProcessError):
            hosts._make(SimpleNamespace(root=tmp_path), argv, out)
        assert not out.exists()  # a later run makes it again instead of loading half a file
    else:
        hosts._make(SimpleNamespace(root=tmp_path), argv, out)
        assert out.read_text() == out.name  # the maker saw the model's own file name
    assert [p for p in out.parent.rglob("*") if p.is_file() and p != out] == []
