"""The Forge-family random-weight checkpoint and kohya LoRA of ../shared/webui/forge_random_checkpoint.py,
written to disk tensor by tensor so that an SDXL checkpoint fits a 24 GB machine.

The shared maker builds every tensor (right) and then saves through `safetensors.torch.save`, which
holds the whole file as one bytes object and then a second, re-headed copy of it: three copies of a
6.5 GB SDXL checkpoint at once, and the maker was OOM-killed at 24 GB. This runs the shared maker
unchanged except for that last step, which here writes the safetensors header (sorted keys, so the
file is byte-reproducible) and then each tensor's bytes in turn: peak memory is the tensors once.

    python tests/e2e/makers/streamed_checkpoint.py --forge WEBUI --arch sdxl --out X.safetensors --lora L.safetensors
(the shared maker's arguments; run with the host's venv python and its vendored packages on PYTHONPATH)
"""
from __future__ import annotations

import importlib.util
import json
import os
import struct
import sys
from pathlib import Path

import torch

SHARED = Path(os.environ.get("AUTOLORA_MODEL_MAKERS", Path(__file__).resolve().parents[4] / "shared" / "webui"))
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
                      torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def safetensors_header(tensors: dict, metadata: dict) -> bytes:
    """The safetensors header for tensors laid out in sorted-key order, padded with spaces to a multiple
    of 8 bytes as the format asks."""
    header, offset = {"__metadata__": dict(sorted(metadata.items()))}, 0
    for key in sorted(tensors):
        tensor = tensors[key]
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return encoded + b" " * (-len(encoded) % 8)


def save_streamed(tensors: dict, path: str, metadata: dict) -> None:
    """safetensors file of `tensors`, written one tensor at a time (no whole-file buffer)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    header = safetensors_header(tensors, metadata)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for key in sorted(tensors):
            tensor = tensors[key].detach().contiguous().cpu()
            # raw little-endian bytes of any dtype (bf16 has no numpy type, hence the uint8 view)
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def load_shared_maker():
    spec = importlib.util.spec_from_file_location("forge_random_checkpoint", SHARED / "forge_random_checkpoint.py")
    if spec is None or not (SHARED / "forge_random_checkpoint.py").exists():
        raise SystemExit(f"{SHARED}/forge_random_checkpoint.py not found (set AUTOLORA_MODEL_MAKERS)")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    return maker


def main() -> int:
    maker = load_shared_maker()
    maker.save_safetensors = save_streamed
    maker.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
