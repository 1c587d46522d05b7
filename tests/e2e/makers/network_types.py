"""Random-weight SD1.5 LoRA files of the other network types users load into the WebUIs' LoRA extensions:
LoCon, LoHa, LoKr, DoRA and OFT, in the key layouts their loaders read (A1111: extensions-builtin/Lora;
Forge Neo 2.x: modules_forge/packages/comfy/weight_adapter/{lora,loha,lokr,oft}.py and comfy/lora.py;
Forge main and the October-2025 Neo tree: backend/patcher/lora.py, without OFT).

Written the way the suite's kohya LoRA is (../shared/webui/forge_random_checkpoint.py): the module
names and shapes diffusers' UNet2DConditionModel and transformers' CLIPTextModel give
runwayml/stable-diffusion-v1-5's configs (SD15_UNET, SD15_TEXT_ENCODER), enumerated here in the order
their named_modules() visits them, so that no WebUI's venv needs diffusers (the files are byte for byte
those built from the two classes on the meta device, diffusers 0.31, transformers 4.46), kohya/LyCORIS names
(`lora_unet_<diffusers module path with _>`, `lora_te_text_model_encoder_layers_N_...`), float16
tensors, deterministic by seed, saved tensor by tensor with sorted keys (byte-reproducible).

Types, the modules they target and their tensors per module:
  locon  kohya LoCon (networks.lora with conv_dim): every Linear / 1x1 conv of the Transformer2DModel
         blocks, every conv (3x3 conv1/conv2, the strided downsampler, the upsampler; 1x1 conv_shortcut)
         and Linear (time_emb_proj) of ResnetBlock2D / Downsample2D / Upsample2D, and the text encoder's
         attention and MLP Linears: lora_down.weight (r, in[, k, k]), lora_up.weight (out, r[, 1, 1]), alpha
  loha   LyCORIS LoHa, the same modules: hada_w1_a (out, r), hada_w1_b (r, in·k·k), hada_w2_a, hada_w2_b, alpha
  lokr   LyCORIS LoKr, the same modules: lokr_w1 (f, g) full (f, g ≤ 8), lokr_w2_a (out/f, r),
         lokr_w2_b (r, in/g·k·k), alpha
  dora   kohya LoRA (the attention blocks' Linears / 1x1 convs, the text encoder) with DoRA magnitudes:
         lora_down, lora_up, alpha, dora_scale (out, 1[, 1, 1]) = the checkpoint's row norms × (1 + N(0, 0.1²))
  oft    LyCORIS/kohya diag-OFT, the attention blocks' Linears / 1x1 convs and the text encoder:
         oft_blocks (out/b, b, b), alpha (the norm constraint of comfy's OFTAdapter; binds for the larger modules)

The file's metadata says which type it is and how many UNet and text-encoder modules it has
(`autolora_e2e_type`, `autolora_e2e_unet_modules`, `autolora_e2e_te_modules`): the e2e test checks the
WebUI's log line "[LORA] Loaded <file> for ...-UNet with N keys" against them.

Sizes: ΔW has about the magnitude of the random checkpoint's own weights (scale 1), so that every type
visibly changes a 64x64 image at strength 1.

    python tests/e2e/makers/network_types.py --type loha --out models/Lora/x.safetensors \
        [--ckpt models/Stable-diffusion/rand_sd15.safetensors (dora: the row norms)] [--seed 1] [--rank 4] [--scale 1]
(run with the host's venv python: torch, safetensors)
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from streamed_checkpoint import save_streamed  # noqa: E402

TYPES = ("locon", "loha", "lokr", "dora", "oft")
SEED_OFFSET = {t: 1000 * (i + 1) for i, t in enumerate(TYPES)}  # each type its own random stream
OFT_BLOCK = 32  # diag-OFT block size (a divisor of every SD1.5 output width)
OFT_CONSTRAINT = 10.0  # comfy's OFTAdapter: ||Q||_F is scaled down to alpha when larger (alpha > 0)


def kohya_name(prefix: str, module_path: str) -> str:
    return prefix + "_" + module_path.replace(".", "_")


# The structure fields of runwayml/stable-diffusion-v1-5's unet/config.json and text_encoder/config.json
# (the copies Forge ships in backend/huggingface/; reForge, Forge Classic and A1111 ship none): they
# fix the module names and shapes, nothing else is read from them.
SD15_UNET = {"attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
             "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 64}
SD15_TEXT_ENCODER = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                     "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 768}
TIME_EMBED_DIM = 4 * SD15_UNET["block_out_channels"][0]  # diffusers' TimestepEmbedding width


def _resnet(path: str, c_in: int, c_out: int) -> list:
    """ResnetBlock2D's layers in diffusers' registration order: conv1, time_emb_proj, conv2, conv_shortcut."""
    layers = [(f"{path}.conv1", (c_out, c_in, (3, 3))), (f"{path}.time_emb_proj", (c_out, TIME_EMBED_DIM, ())),
              (f"{path}.conv2", (c_out, c_out, (3, 3)))]
    return layers + ([(f"{path}.conv_shortcut", (c_out, c_in, (1, 1)))] if c_in != c_out else [])


def _transformer(path: str, c: int) -> list:
    """Transformer2DModel's layers (one BasicTransformerBlock, 1x1-conv projections as in SD1.5)."""
    block, ctx = f"{path}.transformer_blocks.0", SD15_UNET["cross_attention_dim"]
    layers = [(f"{path}.proj_in", (c, c, (1, 1)))]
    for attn, kv_in in (("attn1", c), ("attn2", ctx)):
        layers += [(f"{block}.{attn}.to_q", (c, c, ())), (f"{block}.{attn}.to_k", (c, kv_in, ())),
                   (f"{block}.{attn}.to_v", (c, kv_in, ())), (f"{block}.{attn}.to_out.0", (c, c, ()))]
    layers += [(f"{block}.ff.net.0.proj", (8 * c, c, ())), (f"{block}.ff.net.2", (c, 4 * c, ()))]
    return layers + [(f"{path}.proj_out", (c, c, (1, 1)))]


def unet_blocks() -> list:
    """[(block kind, [(path, shape)])] of SD1.5's UNet2DConditionModel, in the order its named_modules()
    visits them (diffusers registers down_blocks, up_blocks, then mid_block; a cross-attention block its
    attentions before its resnets); shape = (out, in, kernel), kernel () for a Linear."""
    channels, per_block = SD15_UNET["block_out_channels"], SD15_UNET["layers_per_block"]
    blocks, c_in = [], channels[0]
    for i, (kind, c) in enumerate(zip(SD15_UNET["down_block_types"], channels)):
        path = f"down_blocks.{i}"
        attention = [("attention", _transformer(f"{path}.attentions.{j}", c)) for j in range(per_block)]
        resnets = [("conv", _resnet(f"{path}.resnets.{j}", c_in if j == 0 else c, c)) for j in range(per_block)]
        blocks += (attention if kind.startswith("CrossAttn") else []) + resnets
        if i < len(channels) - 1:
            blocks.append(("conv", [(f"{path}.downsamplers.0.conv", (c, c, (3, 3)))]))
        c_in = c
    reversed_channels, previous = channels[::-1], channels[-1]
    for i, (kind, c) in enumerate(zip(SD15_UNET["up_block_types"], reversed_channels)):
        path, skip_in = f"up_blocks.{i}", reversed_channels[min(i + 1, len(channels) - 1)]
        resnets = []
        for j in range(per_block + 1):
            skip = skip_in if j == per_block else c
            resnets.append(("conv", _resnet(f"{path}.resnets.{j}", (previous if j == 0 else c) + skip, c)))
        attention = [("attention", _transformer(f"{path}.attentions.{j}", c)) for j in range(per_block + 1)]
        blocks += (attention if kind.startswith("CrossAttn") else []) + resnets
        if i < len(channels) - 1:
            blocks.append(("conv", [(f"{path}.upsamplers.0.conv", (c, c, (3, 3)))]))
        previous = c
    c = channels[-1]
    return blocks + [("attention", _transformer("mid_block.attentions.0", c)),
                     ("conv", _resnet("mid_block.resnets.0", c, c)), ("conv", _resnet("mid_block.resnets.1", c, c))]


def text_encoder_layers() -> list:
    """[(path, shape)] of CLIPTextModel's attention and MLP Linears, in transformers' order."""
    d, inner = SD15_TEXT_ENCODER["hidden_size"], SD15_TEXT_ENCODER["intermediate_size"]
    layers = []
    for n in range(SD15_TEXT_ENCODER["num_hidden_layers"]):
        path = f"text_model.encoder.layers.{n}"
        layers += [(f"{path}.self_attn.{proj}", (d, d, ())) for proj in ("k_proj", "v_proj", "q_proj", "out_proj")]
        layers += [(f"{path}.mlp.fc1", (inner, d, ())), (f"{path}.mlp.fc2", (d, inner, ()))]
    return layers


def targets(with_convs: bool) -> list:
    """[(kohya name, diffusers or transformers path, shape, part)] in a fixed order: kohya sd-scripts'
    LoRA targets (networks/lora.py: the Transformer2DModel blocks' Linears and 1x1 convs), with
    `with_convs` (its conv_dim) every layer of the ResnetBlock2D / Downsample2D / Upsample2D blocks too."""
    out = []
    for kind, layers in unet_blocks():
        for path, shape in layers:
            if kind == "attention" or with_convs:
                out.append((kohya_name("lora_unet", path), path, shape, "unet"))
    out += [(kohya_name("lora_te", path), path, shape, "te") for path, shape in text_encoder_layers()]
    return out


def fan_in(shape: tuple) -> int:
    o, i, k = shape
    return i * math.prod(k)


def largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, limit + 1) if n % d == 0)


# -- SD1.5 diffusers path -> the checkpoint's LDM key (DoRA reads the row norms of the real weights) --------

def ldm_key(path: str, part: str) -> str:
    if part == "te":
        return f"cond_stage_model.transformer.{path}.weight"
    m = re.match(r"^(down_blocks\.(\d+)\.attentions\.(\d+)|mid_block\.attentions\.0"
                 r"|up_blocks\.(\d+)\.attentions\.(\d+))\.(.*)$", path)
    if not m:
        raise ValueError(f"no LDM key for {path} (DoRA targets the attention blocks only)")
    _, db, da, ub, ua, rest = m.groups()
    if db is not None:
        block = f"input_blocks.{1 + 3 * int(db) + int(da)}.1"
    elif ub is not None:
        block = f"output_blocks.{3 * int(ub) + int(ua)}.1"
    else:
        block = "middle_block.1"
    return f"model.diffusion_model.{block}.{rest}.weight"


def row_norms(ckpt: Path, keys: list) -> dict:
    from safetensors import safe_open
    out = {}
    with safe_open(str(ckpt), framework="pt") as f:
        for key in keys:
            w = f.get_tensor(key).float()
            out[key] = w.reshape(w.shape[0], -1).norm(dim=1)
    return out


# -- the factors ----------------------------------------------------------------------------------------------

def make(kind: str, mods: list, g: torch.Generator, rank: int, scale: float, norms: dict) -> dict:
    """The tensors of every module. ΔW's entries have a standard deviation of about scale/sqrt(fan_in),
    the order of a default-initialised layer's own weights (1/sqrt(3·fan_in))."""
    t = {}

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    for name, path, shape, part in mods:
        o, i, k = shape
        n = fan_in(shape)
        target = scale / math.sqrt(n)  # the std of ΔW's entries
        if kind in ("locon", "dora"):
            down = randn(rank, i, *k, std=target)
            up = randn(o, rank, *([1, 1] if k else []), std=1 / math.sqrt(rank))
            t[f"{name}.lora_down.weight"], t[f"{name}.lora_up.weight"] = down, up
            t[f"{name}.alpha"] = torch.tensor(float(rank))  # alpha / rank = 1
            if kind == "dora":
                norm = norms[ldm_key(path, part)]
                magnitude = norm * (1 + 0.1 * randn(o))
                t[f"{name}.dora_scale"] = magnitude.reshape(o, *([1] * (1 + len(k))))
        elif kind == "loha":
            # ΔW = (w1a @ w1b) * (w2a @ w2b) * alpha / rank: each product has std sqrt(target)
            half = math.sqrt(target)
            t[f"{name}.hada_w1_a"] = randn(o, rank, std=1 / math.sqrt(rank))
            t[f"{name}.hada_w1_b"] = randn(rank, n, std=half)
            t[f"{name}.hada_w2_a"] = randn(o, rank, std=1 / math.sqrt(rank))
            t[f"{name}.hada_w2_b"] = randn(rank, n, std=half)
            t[f"{name}.alpha"] = torch.tensor(float(rank))
        elif kind == "lokr":
            # ΔW = kron(w1, w2_a @ w2_b) * alpha / rank (LyCORIS: the small factor w1 (f, h) full, the
            # large one w2 (o/f, i/h·k·k) of rank r; a conv's w2 stays 2-D, comfy reshapes the product)
            f_out, f_in = largest_divisor(o, 8), largest_divisor(i, 8)
            t[f"{name}.lokr_w1"] = randn(f_out, f_in)
            t[f"{name}.lokr_w2_a"] = randn(o // f_out, rank, std=1 / math.sqrt(rank))
            t[f"{name}.lokr_w2_b"] = randn(rank, (i // f_in) * math.prod(k), std=target)
            t[f"{name}.alpha"] = torch.tensor(float(rank))
        elif kind == "oft":
            # W' = W + blockdiag(R - I)^T-ish W, R = (I + Q)(I - Q)^-1, Q = B - B^T: R - I ≈ 2Q; a row of ΔW
            # has std 2·std(Q)·sqrt(b)·std(W): std(B) = scale · 0.25 / sqrt(b) gives about half of W
            b = largest_divisor(o, OFT_BLOCK)
            t[f"{name}.oft_blocks"] = randn(o // b, b, b, std=scale * 0.25 / math.sqrt(b))
            t[f"{name}.alpha"] = torch.tensor(OFT_CONSTRAINT)
        else:
            raise ValueError(kind)
    return {key: value.to(torch.float16).contiguous() for key, value in t.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--type", required=True, choices=TYPES)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", type=Path, help="the SD1.5 checkpoint (needed by dora: its weights' row norms)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--scale", type=float, default=1.0, help="ΔW's size relative to the layer's own weights")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    with_convs = args.type in ("locon", "loha", "lokr")
    mods = targets(with_convs)
    norms = {}
    if args.type == "dora":
        if args.ckpt is None:
            ap.error("--type dora needs --ckpt (DoRA's magnitudes are the checkpoint's row norms)")
        norms = row_norms(args.ckpt, [ldm_key(path, part) for _, path, _, part in mods])
    g = torch.Generator().manual_seed(args.seed + SEED_OFFSET[args.type])
    tensors = make(args.type, mods, g, args.rank, args.scale, norms)
    n_unet = sum(1 for m in mods if m[3] == "unet")
    n_te = len(mods) - n_unet
    module = {"locon": "networks.lora", "dora": "networks.lora", "oft": "networks.oft"}.get(args.type, "lycoris.kohya")
    meta = {"ss_network_module": module, "ss_network_dim": str(args.rank), "ss_base_model_version": "sd_v1",
            "ss_output_name": Path(args.out).stem, "autolora_e2e_type": args.type,
            "autolora_e2e_unet_modules": str(n_unet), "autolora_e2e_te_modules": str(n_te),
            "note": "random weights, for testing only"}
    if args.type in ("loha", "lokr"):
        meta["ss_network_args"] = '{"algo": "%s", "conv_dim": "%d"}' % (args.type, args.rank)
    if args.type == "locon":
        meta["ss_network_args"] = '{"conv_dim": "%d", "conv_alpha": "%d"}' % (args.rank, args.rank)
    save_streamed(tensors, args.out, meta)  # whole or not at all: the suite's _make moves it in
    print(f"wrote {args.out}: {args.type}, {len(tensors)} tensors, {n_unet} UNet + {n_te} text-encoder modules, "
          f"rank {args.rank}, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
