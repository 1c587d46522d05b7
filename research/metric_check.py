"""Is the demo's finding an artefact of its diversity metric? The same comparison, three metrics.

    python -m research.metric_check

The demo measures Diversity (the paper's Eq. 8) on a small digit classifier's features, a
stand-in for DINOv2. A classifier is trained to map different drawings of one digit close
together, so it could hide diversity that is there in the images. This samples LoRA + CFG and
AutoLoRA + CFG (gamma 1.5) on the same seeds and scores both with the classifier's Diversity and
with two measures that use no trained network: Eq. 8 on the raw pixels and the mean pairwise
Euclidean distance between the images (`metrics.pixel_diversity`). The settings are declared
here, before the run; seeds 11000-11031 are used nowhere else.
"""
from __future__ import annotations

import argparse
import time

import torch

from demo.__main__ import Settings, load_lora_model, prompts, sample_autolora, sample_lora_cfg
from demo.metrics import Evaluators, pixel_diversity

SCALES = (0.6, 0.8, 1.0)
GAMMA = 1.5
SEEDS_PER_CLASS = 32
FIRST_SEED = 11000  # not the demo's (1000), the tests' (5000), the sweep's (7000) nor front's (9000)


def run(evaluators: Evaluators, scales=SCALES, gamma: float = GAMMA, samples_per_class: int = SEEDS_PER_CLASS,
        settings: Settings = Settings()) -> list:
    """[(scale, {"LoRA+CFG": (feature Div, pixel Div, pixel distance), "AutoLoRA+CFG": ...})]"""
    rows = []
    labels, seeds = prompts(samples_per_class, first_seed=FIRST_SEED)
    for scale in scales:
        model, factors = load_lora_model(scale)
        cells = {}
        for name, images in (("LoRA+CFG", sample_lora_cfg(model, labels, seeds, settings)),
                             ("AutoLoRA+CFG", sample_autolora(model, factors, labels, seeds, gamma, settings))):
            cells[name] = (evaluators.score(images, labels).diversity, *pixel_diversity(images, labels))
        rows.append((scale, cells))
    return rows


def format_rows(rows, gamma: float, settings: Settings, samples_per_class: int) -> str:
    lines = [f"LoRA+CFG vs AutoLoRA+CFG (gamma {gamma:g}), CFG {settings.cfg:g}, {settings.sampler} "
             f"{settings.steps} steps, {samples_per_class} seeds x 10 digits per cell; Diversity by three metrics",
             "LoRA scale | classifier Eq. 8     | pixel Eq. 8          | pixel mean distance  | AutoLoRA more diverse by",
             "           |  LoRA+CFG  AutoLoRA  |  LoRA+CFG  AutoLoRA  |  LoRA+CFG  AutoLoRA  "
             "| (classifier, pixel, distance)"]
    for scale, cells in rows:
        lora, auto = cells["LoRA+CFG"], cells["AutoLoRA+CFG"]
        verdict = ", ".join("yes" if a > b else "no" for a, b in zip(auto, lora))
        lines.append(f"      {scale:4.2f} |  {lora[0]:8.4f}  {auto[0]:8.4f}  |  {lora[1]:8.4f}  {auto[1]:8.4f}  |"
                     f"  {lora[2]:8.3f}  {auto[2]:8.3f}  | {verdict}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    settings = Settings()
    rows = run(Evaluators.load(), settings=settings)
    print(format_rows(rows, GAMMA, settings, SEEDS_PER_CLASS))
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
