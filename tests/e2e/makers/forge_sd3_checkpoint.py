"""A random-weight SD3-family single file that Forge loads: a small MMDiT with the real CLIP-L, CLIP-G,
T5-XXL and 16-channel VAE, in the layout of Stability's single files (sd3.5_large.safetensors):

    model.diffusion_model.*                 MMDiT (joint_blocks.N.{context_block,x_block}.attn.qkv ...)
    text_encoders.clip_l.transformer.*      CLIP-L with its text projection
    text_encoders.clip_g.transformer.*      CLIP-G with its text projection
    text_encoders.t5xxl.transformer.*       T5-XXL encoder, float8 e4m3fn (as t5xxl_fp8_e4m3fn)
    first_stage_model.*                     the SD3 VAE (LDM layout)

Forge sizes the MMDiT from the weights (huggingface_guess: depth = x_embedder width // 64), so a depth-2
MMDiT keeps sampling fast on a CPU; every other part has the fixed size Forge builds from its configs
(backend/huggingface/stabilityai/stable-diffusion-3-medium-diffusers), and Forge will not build SD3
without a T5. In float8 the T5 takes 4.7 GB instead of 9.5; Forge keeps a float8 T5 in float8 and casts
each layer when it runs. The MMDiT has SD3.5's RMS q/k norm.

Shapes come from Forge's own classes (MMDiTX, IntegratedCLIP, IntegratedT5 on the meta device,
IntegratedAutoencoderKL); values are PyTorch's default initialisation, seeded per part, except the
T5, which is filled tensor by tensor (normal, std 1/sqrt(fan-in); its embedding std 1) so that only
its float8 copy is ever held. The file is written tensor by tensor (streamed_checkpoint.py) and is
byte-reproducible.

    cd FORGE/webui && ../venv/bin/python .../forge_sd3_checkpoint.py --forge . --out models/Stable-diffusion/x.safetensors
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO_CONFIGS = os.path.join("backend", "huggingface", "stabilityai", "stable-diffusion-3-medium-diffusers")
FLOAT8 = torch.float8_e4m3fn


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mmdit(mmditx, depth: int, pos_embed_max_size: int, seed: int, dtype) -> dict:
    hidden = 64 * depth
    torch.manual_seed(seed)
    model = mmditx.MMDiTX(input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=depth,
                          adm_in_channels=768 + 1280, pos_embed_max_size=pos_embed_max_size,
                          num_patches=pos_embed_max_size ** 2, pos_embed_scaling_factor=None, qk_norm="rms",
                          context_embedder_config={"target": "torch.nn.Linear",
                                                   "params": {"in_features": 4096, "out_features": hidden}})
    table = mmditx.get_2d_sincos_pos_embed(hidden, pos_embed_max_size)  # real files store the fixed table
    with torch.no_grad():
        model.pos_embed.copy_(torch.from_numpy(table).float().reshape(1, -1, hidden))
        for module in model.modules():  # mmditx.RMSNorm allocates its scale with torch.empty and never sets it
            if isinstance(module, mmditx.RMSNorm) and module.weight is not None:
                module.weight.fill_(1.0)
    bad = [k for k, v in model.state_dict().items() if not torch.isfinite(v).all()]
    assert not bad, f"non-finite MMDiT weights: {bad}"
    return {k: v.to(dtype) for k, v in model.state_dict().items()}


def clip(IntegratedCLIP, forge: str, sub: str, seed: int, dtype) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel
    config = CLIPTextConfig.from_pretrained(os.path.join(forge, REPO_CONFIGS, sub))
    torch.manual_seed(seed)
    model = IntegratedCLIP(CLIPTextModel, config, add_text_projection=True).to(dtype)
    state = model.state_dict()
    state.pop("logit_scale", None)
    state["transformer.text_model.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]
    return state


def t5_float8(IntegratedT5, forge: str, seed: int) -> dict:
    from backend.utils import read_arbitrary_config
    config = read_arbitrary_config(os.path.join(forge, REPO_CONFIGS, "text_encoder_3"))
    with torch.device("meta"):
        model = IntegratedT5(config)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, meta in sorted(model.state_dict().items()):
        if name == "logit_scale" or name.endswith("embed_tokens.weight"):  # not in T5 files; tied to `shared`
            continue
        if name.endswith("layer_norm.weight"):
            value = torch.ones(meta.shape)
        elif name.endswith("relative_attention_bias.weight") or name.endswith("shared.weight"):
            value = torch.randn(meta.shape, generator=g)
        else:  # Linear (out, in)
            value = torch.randn(meta.shape, generator=g) / meta.shape[-1] ** 0.5
        out[name] = value.to(FLOAT8)
    return out


def vae(IntegratedAutoencoderKL, forge: str, seed: int, dtype) -> dict:
    torch.manual_seed(seed)
    model = IntegratedAutoencoderKL.from_config(IntegratedAutoencoderKL.load_config(
        os.path.join(forge, REPO_CONFIGS, "vae")))
    return {k: v.to(dtype) for k, v in model.state_dict().items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--forge", required=True, help="the Forge tree (launch.py, backend/)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--depth", type=int, default=2, help="MMDiT depth (SD3 Medium 24, SD3.5 Large 38)")
    ap.add_argument("--pos-embed-max-size", type=int, default=192, help="SD3's 192: images up to 1536 px")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    forge = os.path.abspath(args.forge)

    streamed = _module("streamed_checkpoint")
    shared = streamed.load_shared_maker()
    hg, _unet, IntegratedAutoencoderKL = shared.forge_imports(forge)  # Forge's sys.path and backend args
    from backend.nn import mmditx
    from backend.nn.clip import IntegratedCLIP
    from backend.nn.t5 import IntegratedT5

    fp16 = torch.float16
    tensors = {}
    parts = (("model.diffusion_model.", lambda: mmdit(mmditx, args.depth, args.pos_embed_max_size, args.seed, fp16)),
             ("text_encoders.clip_l.", lambda: clip(IntegratedCLIP, forge, "text_encoder", args.seed + 1, fp16)),
             ("text_encoders.clip_g.", lambda: clip(IntegratedCLIP, forge, "text_encoder_2", args.seed + 2, fp16)),
             ("text_encoders.t5xxl.", lambda: t5_float8(IntegratedT5, forge, args.seed + 3)),
             ("first_stage_model.", lambda: vae(IntegratedAutoencoderKL, forge, args.seed + 4, fp16)))
    for prefix, build in parts:
        tensors.update({prefix + k: v.contiguous() for k, v in build().items()})

    guess = hg.guess(tensors)
    print(f"huggingface_guess: {type(guess).__name__} ({guess.huggingface_repo}), "
          f"text encoders {sorted(guess.clip_target(tensors))}")
    assert type(guess).__name__ in ("SD3", "SD35"), f"detected {type(guess).__name__}, wanted SD3"
    streamed.save_streamed(tensors, args.out, {"format": "pt", "note": "random weights, for testing only"})
    n = sum(v.numel() for v in tensors.values())
    print(f"wrote {args.out}: {len(tensors)} tensors, {n / 1e6:.1f}M params, "
          f"{os.path.getsize(args.out) / 2 ** 30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
