"""The Forge-family random-weight checkpoint and kohya LoRA of ../shared/webui/forge_random_checkpoint.py,
written to disk tensor by tensor so that an SDXL checkpoint fits a 24 GB machine.

The shared maker builds every tensor (right) and then saves through `safetensors.torch.save`, which
holds the whole file as one bytes object and then a second, re-headed copy of it: three copies of a
6.5 GB SDXL checkpoint at once, and the maker was OOM-killed at 24 GB. This runs the shared maker
unchanged except for that last step, which here writes the safetensors header (sorted keys, so the
file is byte-reproducible) and then each tensor's bytes in turn: peak memory is the tensors once.

    python tests/e2e/makers/streamed_checkpoint.py --forge WEBUI --arch sdxl --out X.safetensors --lora L.safetensors
(the shared maker's arguments; run with the host's venv python). Forge Neo vendors huggingface_guess in
modules_forge/packages: that folder is put on sys.path when it exists.

--backend-cpu-flag (taken out of the arguments before the shared maker parses them): the flag that
`backend.args` is parsed with before the maker imports Forge's backend. The shared maker parses it
with `--always-cpu`, which Forge Neo 2.x's backend/args.py (ComfyUI's) does not have: its
memory_management then probes CUDA at import ("Torch not compiled with CUDA enabled"). With `--cpu`
the namespace is parsed and cached first (as ../shared/webui/forge_neo226_random_checkpoint.py does)
and the maker's own import reuses it. `auto` (default) picks `--cpu` when the tree's backend/args.py
declares it and not `--always-cpu`, else leaves the maker alone.
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


def cpu_flag_for(forge: Path) -> str:
    """`--cpu` for a tree whose backend/args.py is ComfyUI's (Forge Neo 2.x), else `--always-cpu`."""
    try:
        text = (forge / "backend" / "args.py").read_text(errors="replace")
    except OSError:
        return "--always-cpu"
    return "--cpu" if '"--cpu"' in text and '"--always-cpu"' not in text else "--always-cpu"


def pop_option(argv: list, name: str, default):
    """The value of `name VALUE` / `name=VALUE`, removed from argv (the shared maker's parser does
    not know it), or default."""
    for i, arg in enumerate(list(argv)):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if arg.startswith(name + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return default


def prepare_backend(argv: list) -> None:
    """Put Forge Neo's vendored packages on sys.path and pre-parse backend.args with the CPU flag the
    tree knows (see the module docstring)."""
    flag = pop_option(argv, "--backend-cpu-flag", "auto")
    forge = pop_option(list(argv), "--forge", None)
    if forge is None:
        return
    forge = Path(forge).resolve()
    for path in (forge / "modules_forge" / "packages", forge):
        if path.is_dir() and str(path) not in sys.path:
            sys.path.insert(0, str(path))
    if flag not in ("auto", "--cpu", "--always-cpu"):
        raise SystemExit(f"--backend-cpu-flag: auto, --cpu or --always-cpu, not {flag!r}")
    if flag == "auto":
        flag = cpu_flag_for(forge)
    if flag == "--always-cpu":
        return  # what the shared maker does itself
    saved, sys.argv = sys.argv, sys.argv[:1] + [flag]
    try:
        import backend.args  # noqa: F401  (parses [flag]; the maker's import then reuses the cached module)
    finally:
        sys.argv = saved


def main() -> int:
    prepare_backend(sys.argv)
    maker = load_shared_maker()
    maker.save_safetensors = save_streamed
    maker.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
