"""The offline demo: AutoLoRA on a tiny digits diffusion model; no WebUI, no GPU, no download.

    python -m demo --grid docs/demo_grid.png

It runs the WebUI scripts' core path: the kohya reader turns the shipped LoRA into LoraFactors,
the LoRA is merged into the model's weights at the requested scale (`kohya.merge_into`, as a
host's merged LoRA mode does), and the base branch is evaluated by a base-branch strategy
(`make_strategy`) inside `AutoLoraGuider`, never by a second, clean model. Sampling uses
k-diffusion's samplers.

It writes a PNG grid (rows: base + CFG, then for each shipped LoRA its training digits, LoRA + CFG
and AutoLoRA + CFG at a few gammas; one seed per column, the same in every row) and prints, for
each shipped LoRA, a Table 1-like comparison of LoRA + CFG and AutoLoRA + CFG over a sweep of LoRA
scales. Two LoRAs are shipped, "italic negative" (a style far from what the base model knows) and
"bold" (thick strokes, near it); AutoLoRA behaves oppositely on them. A few minutes on a CPU.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from lib_autolora.base_branch import make_strategy, split_batch
from lib_autolora.guidance import cfg
from demo.guider import AutoLoraGuider, BranchConds
from lib_autolora.params import AutoLoraSettings
from demo.kohya import factors_from_kohya, merge_into
from . import data, ksampling
from .metrics import Evaluators, Scores, format_table
from .train import ASSETS, BASE_FILE, EVALUATORS_FILES, LORA, LORA_FILES, SHIPPED_STYLES, load_base

BASE_PATH = ASSETS / BASE_FILE
LORA_PATHS = {style: ASSETS / name for style, name in LORA_FILES.items()}
EVALUATORS_PATHS = {style: ASSETS / name for style, name in EVALUATORS_FILES.items()}
LORA_PATH = LORA_PATHS[data.STYLE_NAME]

GRID_GAMMAS = (1.25, 1.5, 2.0)
TABLE_SCALES = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2)
DEFAULT_GAMMA = 1.5  # the paper's default AutoLoRA scale


@dataclass(frozen=True)
class Settings:
    sampler: str = "dpmpp_2m"
    steps: int = 20
    sigma_min: float = 0.02
    sigma_max: float = 20.0
    cfg: float = 4.0  # w1 = w2, as in the paper's experiments
    strategy: str = "batched"

    def sigmas(self) -> torch.Tensor:
        return ksampling.karras_sigmas(self.steps, self.sigma_min, self.sigma_max)


def load_lora_model(scale: float, base_path=BASE_PATH, lora_path=LORA_PATH):
    """The base model with the LoRA merged in at `scale`, and the LoRA's factors (read at `scale`)."""
    model = load_base(Path(base_path))
    factors = factors_from_kohya(str(lora_path), model.kohya_modules(), strength=scale)
    merge_into(factors)
    return model, factors


def forward_of(model):
    """`forward(x, sigma, labels) -> x0`: the host's model call (text encoder inside, so the base
    branch also sees the text encoder without the LoRA)."""
    def forward(x, sigma, labels):
        return model.denoiser(x, sigma, model.text_encoder(labels))
    return forward


class SeedNoise:
    """Per-seed noise, as the WebUI draws it: one generator per seed gives the initial noise and,
    for ancestral samplers, every later draw, so that a sample depends on its seed only, not on its
    batch, and two methods sampled on the same seeds see the same noise."""

    def __init__(self, seeds: Sequence[int], shape=(1, 8, 8)):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape = shape

    def draw(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])

    def __call__(self, sigma, sigma_next) -> torch.Tensor:  # k-diffusion's noise_sampler contract
        return self.draw()


def run_sampler(denoiser, seeds: Sequence[int], settings: Settings) -> torch.Tensor:
    noise = SeedNoise(seeds)
    x = noise.draw() * settings.sigma_max
    extra = {"noise_sampler": noise} if settings.sampler in ksampling.ANCESTRAL else {}
    with torch.no_grad():
        return ksampling.sample(settings.sampler, denoiser, x, settings.sigmas(), **extra).clamp(-1, 1)


def sample_lora_cfg(model, labels, seeds, settings: Settings) -> torch.Tensor:
    """Plain CFG on the LoRA'd model: what the WebUI does without AutoLoRA."""
    forward, n = forward_of(model), len(labels)
    nulls = torch.full_like(labels, model.null_class)

    def denoiser(x, sigma, **_):
        out = forward(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, nulls]))
        cond, uncond = split_batch(out, n)
        return cfg(cond, uncond, settings.cfg)

    return run_sampler(denoiser, seeds, settings)


def sample_autolora(model, factors, labels, seeds, gamma: float, settings: Settings,
                    w1: Optional[float] = None, w2: Optional[float] = None, **controls) -> torch.Tensor:
    """AutoLoRA + CFG, w1 and w2 defaulting to settings.cfg (the WebUI's "same as CFG"); gamma 0
    gives the base model + CFG, via the strategy. `controls`: more of the extension's settings
    (schedule, schedule_power, schedule_floor, cap, base_strength)."""
    nulls = torch.full_like(labels, model.null_class)
    autolora = AutoLoraSettings(enabled=True, gamma=gamma, w1=w1, w2=w2, strategy=settings.strategy, **controls)
    with torch.no_grad(), make_strategy(settings.strategy, factors, 1.0, weights_merged=True,
                                        base_strength=autolora.base_strength) as strategy:
        guider = AutoLoraGuider(forward_of(model), strategy, autolora, lora=BranchConds(labels, nulls),
                                base=BranchConds(labels, nulls), cfg_scale=settings.cfg, sigmas=settings.sigmas())
        return run_sampler(guider, seeds, settings)


def prompts(samples_per_class: int, first_seed: int = 1000):
    """Every digit, `samples_per_class` seeds each (the same seeds for every digit and method)."""
    labels = torch.arange(data.NUM_DIGITS).repeat_interleave(samples_per_class)
    seeds = [first_seed + i for i in range(samples_per_class)] * data.NUM_DIGITS
    return labels, seeds


def compare(scale: float, gamma: float, samples_per_class: int, settings: Settings,
            evaluators: Evaluators, lora_path=LORA_PATH) -> tuple[Scores, Scores]:
    """(LoRA + CFG, AutoLoRA + CFG) scores at one LoRA scale, on the same seeds."""
    model, factors = load_lora_model(scale, lora_path=lora_path)
    labels, seeds = prompts(samples_per_class)
    lora = evaluators.score(sample_lora_cfg(model, labels, seeds, settings), labels)
    auto = evaluators.score(sample_autolora(model, factors, labels, seeds, gamma, settings), labels)
    return lora, auto


# -- the grid -----------------------------------------------------------------------------------
def render_grid(rows, path: Path, cell: int = 4, gap: int = 2, label_width: int = 190) -> None:
    """rows: [(label, images (n, 1, 8, 8) in [-1, 1] or None for an empty cell)] -> PNG."""
    from PIL import Image, ImageDraw
    columns = max(len(images) for _, images in rows)
    size = 8 * cell
    width = label_width + columns * (size + gap)
    height = len(rows) * (size + gap) + gap
    canvas = Image.new("L", (width, height), 96)
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        top = gap + r * (size + gap)
        draw.text((6, top + size // 2 - 6), label, fill=255)
        for c, img in enumerate(images):
            if img is None:
                continue
            pixels = data.to_pixels(img[0]).numpy()
            tile = Image.fromarray(pixels, "L").resize((size, size), Image.NEAREST)
            canvas.paste(tile, (label_width + c * (size + gap), top))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def training_digits(style: str, seeds_per_class: int) -> list:
    """A LoRA's training digits laid out like the samples: `seeds_per_class` cells per digit."""
    images, labels = data.load_digits()
    subset = data.lora_subset(labels, LORA["per_class"], LORA["subset_seed"])
    styled = data.STYLES[style].apply(images[subset])
    cells = []
    for digit in range(data.NUM_DIGITS):
        mine = [styled[i] for i in range(len(subset)) if int(labels[subset[i]]) == digit]
        cells.extend((mine + [None] * seeds_per_class)[:seeds_per_class])
    return cells


def grid_rows(settings: Settings, seeds_per_class: int = 3, scale: float = 1.0, gammas=GRID_GAMMAS,
              styles=SHIPPED_STYLES):
    labels, seeds = prompts(seeds_per_class)
    rows = []
    for style in styles:
        model, factors = load_lora_model(scale, lora_path=LORA_PATHS[style])
        if not rows:  # the base model's samples do not depend on which LoRA the strategy removes
            rows.append((f"base + CFG {settings.cfg:g}", sample_autolora(model, factors, labels, seeds, 0.0, settings)))
        rows += [(f"{style}: training set", training_digits(style, seeds_per_class)),
                 (f"LoRA {scale:g} + CFG", sample_lora_cfg(model, labels, seeds, settings))]
        for gamma in gammas:
            images = sample_autolora(model, factors, labels, seeds, gamma, settings)
            rows.append((f"AutoLoRA g={gamma:g} + CFG", images))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=Path, default=Path("out/demo_grid.png"), help="where to write the PNG grid")
    parser.add_argument("--samples", type=int, default=32, help="samples per digit class for the table")
    parser.add_argument("--scales", type=float, nargs="+", default=list(TABLE_SCALES), help="LoRA scales")
    parser.add_argument("--gamma", type=float, default=DEFAULT_GAMMA, help="AutoLoRA scale for the table")
    parser.add_argument("--cfg", type=float, default=Settings.cfg, help="CFG scale of both branches")
    parser.add_argument("--sampler", default=Settings.sampler, choices=sorted(ksampling.SAMPLERS))
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--strategy", default=Settings.strategy, choices=["batched", "sequential", "swap", "toggle"])
    parser.add_argument("--styles", nargs="+", default=list(SHIPPED_STYLES), choices=SHIPPED_STYLES,
                        help="which shipped LoRAs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = replace(Settings(), cfg=args.cfg, sampler=args.sampler, steps=args.steps, strategy=args.strategy)
    start = time.time()

    render_grid(grid_rows(settings, styles=args.styles), args.grid)
    print(f"grid: {args.grid}")

    labels, seeds = prompts(args.samples)
    for style in args.styles:
        evaluators = Evaluators.load(EVALUATORS_PATHS[style])
        base_model, base_factors = load_lora_model(1.0, lora_path=LORA_PATHS[style])
        base = evaluators.score(sample_autolora(base_model, base_factors, labels, seeds, 0.0, settings), labels)
        rows = [(scale, *compare(scale, args.gamma, args.samples, settings, evaluators, LORA_PATHS[style]))
                for scale in args.scales]
        print(f"\nLoRA {style!r}: LoRA+CFG vs AutoLoRA+CFG (gamma {args.gamma:g}), CFG {settings.cfg:g} in both "
              f"branches, {settings.sampler} {settings.steps} steps, {args.samples} seeds x 10 digits per cell")
        print(format_table(rows, base))
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
