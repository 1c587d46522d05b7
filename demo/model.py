"""A tiny class-conditional denoiser with the layer kinds LoRAs touch in Stable Diffusion.

TinyTextEncoder: class id -> a few context tokens (Embedding + two Linear layers; LoRA prefix
`lora_te`). TinyUNet: convs, ResBlocks with a time-embedding Linear, a down/up level and a
cross-attention block (to_q/to_k/to_v/to_out Linears) reading the context (LoRA prefix
`lora_unet`). `KarrasDenoiser` wraps it with the preconditioning of Karras et al. (2022), so that
k-diffusion samplers call `denoiser(x, sigma, cond) -> x0` as they call the WebUIs' wrappers.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


class TinyTextEncoder(nn.Module):
    def __init__(self, num_classes: int = 11, dim: int = 32, tokens: int = 4):
        super().__init__()
        self.embed = nn.Embedding(num_classes, dim)
        self.pos = nn.Parameter(torch.randn(tokens, dim) * 0.1)
        self.fc1 = nn.Linear(dim, dim * 2)
        self.fc2 = nn.Linear(dim * 2, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        h = self.embed(labels)[:, None, :] + self.pos
        return h + self.fc2(F.gelu(self.fc1(h)))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class CrossAttention(nn.Module):
    def __init__(self, channels: int, context_dim: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(8, channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(context_dim, channels, bias=False)
        self.to_v = nn.Linear(context_dim, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context):
        b, c, hgt, wid = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (b, hw, c)
        q, k, v = self.to_q(h), self.to_k(context), self.to_v(context)
        split = lambda t: t.reshape(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(split(q), split(k), split(v))
        a = self.to_out(a.transpose(1, 2).reshape(b, hgt * wid, c))
        return x + self.proj_out(a.transpose(1, 2).reshape(b, c, hgt, wid))


class TinyUNet(nn.Module):
    def __init__(self, channels: int = 1, width: int = 32, context_dim: int = 32):
        super().__init__()
        temb = width * 2
        self.width = width
        self.time_1 = nn.Linear(width, temb)
        self.time_2 = nn.Linear(temb, temb)
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.down_res = ResBlock(width, width, temb)
        self.down = nn.Conv2d(width, width * 2, 3, stride=2, padding=1)
        self.mid_res = ResBlock(width * 2, width * 2, temb)
        self.mid_attn = CrossAttention(width * 2, context_dim)
        self.up = nn.ConvTranspose2d(width * 2, width, 4, stride=2, padding=1)
        self.up_res = ResBlock(width * 2, width, temb)
        self.up_attn = CrossAttention(width, context_dim)
        self.norm_out = nn.GroupNorm(8, width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def time_embedding(self, c_noise):
        half = self.width // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=c_noise.device) / half)
        args = c_noise.float()[:, None] * freqs[None] * 100
        emb = torch.cat([args.sin(), args.cos()], 1).to(self.time_1.weight.dtype)
        return self.time_2(F.silu(self.time_1(emb)))

    def forward(self, x, c_noise, context):
        temb = self.time_embedding(c_noise)
        h0 = self.conv_in(x)
        h1 = self.down_res(h0, temb)
        h = self.mid_res(self.down(h1), temb)
        h = self.mid_attn(h, context)
        h = self.up_res(torch.cat([self.up(h), h1], 1), temb)
        h = self.up_attn(h, context)
        return self.conv_out(F.silu(self.norm_out(h)))


class KarrasDenoiser(nn.Module):
    """x0 = c_skip * x + c_out * F(c_in * x, c_noise, context)  (EDM preconditioning)."""

    def __init__(self, unet: TinyUNet, sigma_data: float = 0.5):
        super().__init__()
        self.unet = unet
        self.sigma_data = sigma_data

    def forward(self, x, sigma, context):
        # Preconditioning in the sampler's dtype, the network in its own (as the WebUIs do).
        sd = self.sigma_data
        dtype = self.unet.conv_in.weight.dtype
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        c_skip = sd ** 2 / (s ** 2 + sd ** 2)
        c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
        c_in = 1 / (s ** 2 + sd ** 2).sqrt()
        c_noise = sigma.log() / 4
        f = self.unet((x * c_in).to(dtype), c_noise, context.to(dtype))
        return c_skip * x + c_out * f.to(x.dtype)


class TinyDiffusionModel(nn.Module):
    """Text encoder + denoiser, the two places a LoRA lives."""

    def __init__(self, num_classes: int = 11, width: int = 32, context_dim: int = 32, channels: int = 1):
        super().__init__()
        self.text_encoder = TinyTextEncoder(num_classes, context_dim)
        self.denoiser = KarrasDenoiser(TinyUNet(channels, width, context_dim))

    @property
    def null_class(self) -> int:
        return self.text_encoder.embed.num_embeddings - 1

    def kohya_modules(self) -> dict:
        from demo.kohya import kohya_names
        return {**kohya_names(self.denoiser.unet, "lora_unet"), **kohya_names(self.text_encoder, "lora_te")}
