"""Train the demo's shipped weights, deterministically, on a CPU (a few minutes on two cores).

    python -m demo.train            # writes demo/assets/*.safetensors
    python -m demo.train --out DIR  # somewhere else

Three stages, each from its own fixed seed:
1. evaluators: the digit classifier (feature extractor) and the style classifier (metrics.py);
2. base: the class-conditional TinyDiffusionModel on all 1,797 plain digits, EDM loss, 10% of
   labels replaced by the null class so that the model also learns the CFG uncond;
3. LoRAs: rank-4 factors on every Linear / Conv2d of the denoiser and the text encoder, trained on
   20 digits (2 per class) in one style for thousands of epochs, so that they overfit the way
   community LoRAs do (they reproduce their training digits); two are shipped, "italic negative"
   and "bold" (thick strokes), each with evaluators for its style; 10% caption dropout (kohya's
   `--caption_dropout_rate`), without which the LoRA'd model's uncond is untrained and CFG breaks
   its samples. Saved in kohya's format, which `demo.kohya` reads.

About 5 minutes on two idle cores (evaluators ~10 s, base ~3 min, each LoRA ~1 min); much longer on a
loaded machine. Bit-identical files need the same torch build, CPU kind and thread count.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from . import data
from .metrics import DigitNet, Evaluators, StyleNet
from .model import TinyDiffusionModel

ASSETS = Path(__file__).parent / "assets"
BASE_FILE = "base.safetensors"
LORA_FILE = "lora_italic_negative.safetensors"
EVALUATORS_FILE = "evaluators.safetensors"
STAGES = ("evaluators", "base", "lora")
# Two shipped LoRAs, one recipe: a style far from anything the base knows (the palette inverted)
# and one near it (thick strokes); AutoLoRA behaves oppositely on them (docs/demo.md).
SHIPPED_STYLES = (data.STYLE_NAME, "bold")
LORA_FILES = {data.STYLE_NAME: LORA_FILE, "bold": "lora_bold.safetensors"}
EVALUATORS_FILES = {data.STYLE_NAME: EVALUATORS_FILE, "bold": "evaluators_bold.safetensors"}

MODEL_CONFIG = dict(num_classes=data.NUM_DIGITS + 1, width=32, context_dim=32, channels=1)

# EDM (Karras et al., 2022) training noise distribution: log sigma ~ N(P_MEAN, P_STD^2).
P_MEAN, P_STD = -1.2, 1.2

BASE = dict(seed=0, steps=4000, batch=128, lr=2e-3, warmup=200, ema=0.999, label_dropout=0.1)
LORA = dict(seed=1, steps=1500, repeats=4, lr=2e-3, rank=4, alpha=4.0, per_class=2, subset_seed=4,
            caption_dropout=0.1)
EVAL = dict(seed=2, epochs=6, batch=128, lr=2e-3, noise=0.1)


def log(msg: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def edm_loss(model: TinyDiffusionModel, x0: torch.Tensor, labels: torch.Tensor, g: torch.Generator):
    """Karras et al.'s weighted denoising loss for the x0-predicting KarrasDenoiser."""
    n = x0.shape[0]
    sigma = (torch.randn(n, generator=g) * P_STD + P_MEAN).exp()
    noisy = x0 + torch.randn(x0.shape, generator=g) * sigma[:, None, None, None]
    denoised = model.denoiser(noisy, sigma, model.text_encoder(labels))
    sd = model.denoiser.sigma_data
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    return (weight[:, None, None, None] * (denoised - x0) ** 2).mean()


# -- stage 1: evaluators ------------------------------------------------------------------------
def _fit(net: nn.Module, inputs, targets, loss_fn, cfg: dict, g: torch.Generator) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    n = inputs.shape[0]
    for _ in range(cfg["epochs"]):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, cfg["batch"]):
            idx = order[i:i + cfg["batch"]]
            x = inputs[idx] + torch.randn(inputs[idx].shape, generator=g) * cfg["noise"]
            loss = loss_fn(net(x), targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.enable_grad()
def train_evaluators(images, labels, cfg: dict = EVAL,
                     style: data.Style = data.STYLES[data.STYLE_NAME]) -> tuple[Evaluators, dict]:
    torch.manual_seed(cfg["seed"])
    g = torch.Generator().manual_seed(cfg["seed"])
    train_idx, test_idx = data.split(len(labels))

    def views(idx):  # every rendering a sample may come in: plain, half-styled, styled
        x = images[idx]
        rendered = torch.cat([style.negatives(x), style.apply(x)])
        return rendered, labels[idx].repeat(len(rendered) // len(x))

    digit = DigitNet()
    x, y = views(train_idx)
    _fit(digit.train(), x, y, F.cross_entropy, cfg, g)

    def style_views(idx):  # the styled digits repeated to balance the negatives' renderings
        neg, pos = style.negatives(images[idx]), style.apply(images[idx])
        k = len(neg) // len(pos)
        return torch.cat([neg, pos.repeat(k, 1, 1, 1)]), torch.cat([torch.zeros(len(neg)), torch.ones(k * len(pos))])

    style_net = StyleNet()
    xs, ys = style_views(train_idx)
    _fit(style_net.train(), xs, ys, F.binary_cross_entropy_with_logits, cfg, g)

    ev = Evaluators(digit, style_net)
    with torch.no_grad():
        x, y = views(test_idx)
        xs, ys = style_views(test_idx)
        report = {"digit_accuracy_heldout": float((digit(x).argmax(1) == y).float().mean()),
                  "style_accuracy_heldout": float(((style_net(xs) > 0).float() == ys).float().mean())}
    return ev, report


# -- stage 2: the base model --------------------------------------------------------------------
@torch.enable_grad()
def train_base(images, labels, cfg: dict = BASE) -> TinyDiffusionModel:
    torch.manual_seed(cfg["seed"])
    g = torch.Generator().manual_seed(cfg["seed"])
    model = TinyDiffusionModel(**MODEL_CONFIG)
    ema = TinyDiffusionModel(**MODEL_CONFIG)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.99))
    null = model.null_class
    for step in range(cfg["steps"]):
        idx = torch.randint(0, len(labels), (cfg["batch"],), generator=g)
        y = labels[idx].clone()
        y[torch.rand(len(y), generator=g) < cfg["label_dropout"]] = null
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg["steps"], cfg["lr"], cfg["warmup"])
        loss = edm_loss(model, images[idx], y, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - cfg["ema"])
        if step % 500 == 0 or step == cfg["steps"] - 1:
            log(f"base step {step:5d}/{cfg['steps']} loss {loss.item():.4f}")
    return ema.eval()


# -- stage 3: the LoRA --------------------------------------------------------------------------
class TrainingLora:
    """LoRA factors on a frozen model, applied by forward hooks: out += alpha/rank * up(down(x)).

    `down` starts uniform (kaiming-like, as kohya's), `up` at zero, so training starts at the base.
    """

    def __init__(self, modules: dict, rank: int, alpha: float, g: torch.Generator):
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.factors = {}  # kohya name -> (module, down, up)
        self.handles = []
        for name, (_, module) in modules.items():
            if isinstance(module, nn.Conv2d):
                out_c, in_c, kh, kw = module.weight.shape
                fan_in = in_c * kh * kw
                down = (torch.rand(rank, in_c, kh, kw, generator=g) * 2 - 1) / math.sqrt(fan_in)
                up = torch.zeros(out_c, rank, 1, 1)
            else:
                out_f, in_f = module.weight.shape
                down = (torch.rand(rank, in_f, generator=g) * 2 - 1) / math.sqrt(in_f)
                up = torch.zeros(out_f, rank)
            down, up = nn.Parameter(down), nn.Parameter(up)
            self.factors[name] = (module, down, up)
            self.handles.append(module.register_forward_hook(self._hook(module, down, up)))

    def _hook(self, module, down, up):
        def hook(_module, args, output):
            x = args[0]
            if isinstance(module, nn.Conv2d):
                h = F.conv2d(x, down, None, module.stride, module.padding, module.dilation, module.groups)
                return output + F.conv2d(h, up) * self.scale
            return output + F.linear(F.linear(x, down), up) * self.scale
        return hook

    def parameters(self):
        for _, down, up in self.factors.values():
            yield down
            yield up

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def kohya_state_dict(self) -> dict:
        sd = {}
        for name, (_, down, up) in self.factors.items():
            sd[f"{name}.lora_down.weight"] = down.detach().clone().contiguous()
            sd[f"{name}.lora_up.weight"] = up.detach().clone().contiguous()
            sd[f"{name}.alpha"] = torch.tensor(float(self.alpha))
        return sd


@torch.enable_grad()
def train_lora(base: TinyDiffusionModel, images, labels, cfg: dict = LORA,
               style: data.Style = data.STYLES[data.STYLE_NAME]) -> tuple[dict, torch.Tensor]:
    """Returns (kohya state dict, indices of the training digits)."""
    torch.manual_seed(cfg["seed"])
    g = torch.Generator().manual_seed(cfg["seed"])
    subset = data.lora_subset(labels, cfg["per_class"], cfg["subset_seed"])
    x0 = style.apply(images[subset]).repeat(cfg["repeats"], 1, 1, 1)
    y0 = labels[subset].repeat(cfg["repeats"])
    base.requires_grad_(False)
    lora = TrainingLora(base.kohya_modules(), cfg["rank"], cfg["alpha"], g)
    opt = torch.optim.Adam(lora.parameters(), lr=cfg["lr"])
    try:
        for step in range(cfg["steps"]):
            y = y0.clone()
            y[torch.rand(len(y), generator=g) < cfg["caption_dropout"]] = base.null_class
            loss = edm_loss(base, x0, y, g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 500 == 0 or step == cfg["steps"] - 1:
                log(f"LoRA step {step:5d}/{cfg['steps']} loss {loss.item():.4f}")
    finally:
        lora.remove()
    return lora.kohya_state_dict(), subset


# -- files --------------------------------------------------------------------------------------
def save_base(model: TinyDiffusionModel, path: Path) -> None:
    from safetensors.torch import save_file
    meta = {"config": json.dumps(MODEL_CONFIG), "training": json.dumps(BASE),
            "data": "sklearn.datasets.load_digits, all 1797 images, [-1, 1]"}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)


def save_evaluators(evaluators: Evaluators, report: dict, path: Path, extra: Optional[dict] = None) -> None:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in evaluators.state_dict().items()}, str(path),
              metadata={**{k: f"{v:.4f}" for k, v in report.items()}, **(extra or {})})


def load_base(path: Path) -> TinyDiffusionModel:
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    model = TinyDiffusionModel(**config)
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


def save_lora(state_dict: dict, subset: torch.Tensor, path: Path, cfg: dict = LORA,
              style_name: str = data.STYLE_NAME) -> None:
    from safetensors.torch import save_file
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(cfg["rank"]),
            "ss_network_alpha": str(cfg["alpha"]), "autolora_demo_style": style_name,
            "autolora_demo_training": json.dumps(cfg),
            "autolora_demo_subset": json.dumps(subset.tolist())}
    save_file(state_dict, str(path), metadata=meta)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="where to write the weights")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (2: the shipped weights)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="what to train; later stages read earlier ones' files from --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    images, labels = data.load_digits()
    start = time.time()

    if "evaluators" in args.stages:
        for name in SHIPPED_STYLES:
            evaluators, report = train_evaluators(images, labels, style=data.STYLES[name])
            save_evaluators(evaluators, report, args.out / EVALUATORS_FILES[name])
            log(f"evaluators for {name!r} written: {report}")
    if "base" in args.stages:
        save_base(train_base(images, labels), args.out / BASE_FILE)
        log(f"base model written ({time.time() - start:.0f} s so far)")
    if "lora" in args.stages:
        for name in SHIPPED_STYLES:
            state_dict, subset = train_lora(load_base(args.out / BASE_FILE), images, labels, style=data.STYLES[name])
            save_lora(state_dict, subset, args.out / LORA_FILES[name], style_name=name)
            log(f"LoRA {name!r} written ({time.time() - start:.0f} s so far)")
    for name in (BASE_FILE, *LORA_FILES.values(), *EVALUATORS_FILES.values()):
        log(f"  {args.out / name}: {(args.out / name).stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
