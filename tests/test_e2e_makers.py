"""The e2e suite's model makers that run without a WebUI: the streamed safetensors writer."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

MAKER = Path(__file__).resolve().parent / "e2e" / "makers" / "streamed_checkpoint.py"


@pytest.fixture(scope="module")
def streamed():
    spec = importlib.util.spec_from_file_location("streamed_checkpoint", MAKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
