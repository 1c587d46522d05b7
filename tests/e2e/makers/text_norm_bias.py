"""A copy of a random-weight checkpoint whose text encoders' final LayerNorm has a bias, as every
real CLIP has.

The random-weight makers leave that LayerNorm at its initial weight 1 and bias 0, so every token's
features average to exactly 0 and a whole encoding's mean is ~1e-7. The WebUIs' default emphasis
mode divides by that mean (float16 on Forge's CPU text encoder), which is exactly 0 for some
prompts on some CPUs: the host's own image is then black, with or without AutoLoRA (seen on Forge
main with `<lora:…:0.8>` and an empty negative prompt). A real checkpoint's bias keeps the mean far
from 0. This writes the copy byte for byte, only the bias bytes replaced (deterministic: a fixed
seed), so the file stays as small a change as possible and needs no memory for the rest.

    python tests/e2e/makers/text_norm_bias.py SRC.safetensors DST.safetensors
"""
from __future__ import annotations

import json
import shutil
import struct
import sys

import numpy as np

BIAS_KEYS = ("final_layer_norm.bias", "ln_final.bias")
DTYPES = {"F16": np.float16, "BF16": None, "F32": np.float32}


def main(src: str, dst: str) -> int:
    with open(src, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    targets = {k: v for k, v in header.items() if k != "__metadata__" and k.endswith(BIAS_KEYS)}
    if not targets:
        raise SystemExit(f"{src}: no text-encoder final LayerNorm bias found")
    shutil.copyfile(src, dst)  # the suite runs makers into a folder of its own and moves the file in whole
    rng = np.random.default_rng(1234)
    with open(dst, "r+b") as f:
        for key in sorted(targets):
            info = targets[key]
            dtype = DTYPES.get(info["dtype"])
            if dtype is None:
                raise SystemExit(f"{key}: dtype {info['dtype']} not handled")
            start, end = info["data_offsets"]
            values = (0.05 + 0.02 * rng.standard_normal(info["shape"])).astype(dtype)
            assert values.nbytes == end - start
            f.seek(8 + length + start)
            f.write(values.tobytes())
    print(f"wrote {dst}: {len(targets)} final LayerNorm bias(es) set ({', '.join(sorted(targets))})")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
