"""Do the guidance controls buy variety where plain γ does not? Declared before it ran.

    python -m research.controls [--style bold|italic negative] [--first-seed N --samples N --only ...]

On the demo's far LoRA ('italic negative') γ > 1 makes samples *less* varied than LoRA + CFG at the
same LoRA scale; on the near one ('bold') it makes them more varied, at a cost in class accuracy.
This asks, per LoRA, whether a schedule, a cap or a weaker copy of the LoRA as the base model
(base_strength) recovers variety at equal style without losing accuracy, and what each costs.

Declared grid (LoRA scale 1.0, CFG 4 in both branches, dpmpp_2m 20 steps, seeds from 31000, used
nowhere else, 24 per digit): plain γ 1.5 and 2; schedule early / late / middle (power 1, floor 0)
at γ 1.5 and 2; cap 0.25 / 0.5 / 1 at γ 1.5, 2 and 3; base strength 0.25 / 0.5 / 0.75 at γ 1.5,
2 and 3. A setting *recovers variety* when, against LoRA + CFG on the same seeds, its diversity is
at least 8 % higher, its style at most 0.25 lower and its accuracy at most 0.055 lower (the
quality test's declared margins, research/claim_margins.py). Every setting that does is run again
on fresh seeds (from 32000, 96 per digit) with LoRA + CFG resampled on them: only what holds there
counts.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from demo.__main__ import EVALUATORS_PATHS, LORA_PATHS, Settings, load_lora_model, prompts, sample_autolora, sample_lora_cfg
from demo.metrics import Evaluators, Scores
from demo.train import SHIPPED_STYLES

SCALE = 1.0
MIN_GAIN, STYLE_MARGIN, ACC_MARGIN = 0.08, 0.25, 0.055
FIRST_SEED, RECHECK_SEED = 31000, 32000
GRID = ([("plain", {"gamma": g}) for g in (1.5, 2.0)]
        + [(f"schedule {s}", {"gamma": g, "schedule": s}) for s in ("early", "late", "middle") for g in (1.5, 2.0)]
        + [(f"cap {c:g}", {"gamma": g, "cap": c}) for c in (0.25, 0.5, 1.0) for g in (1.5, 2.0, 3.0)]
        + [(f"base strength {b:g}", {"gamma": g, "base_strength": b}) for b in (0.25, 0.5, 0.75)
           for g in (1.5, 2.0, 3.0)])


@dataclass(frozen=True)
class Row:
    name: str
    controls: dict
    scores: Scores
    lora: Scores

    @property
    def gain(self) -> float:
        return self.scores.diversity / self.lora.diversity - 1.0

    @property
    def recovers(self) -> bool:
        return (self.gain >= MIN_GAIN and self.scores.style >= self.lora.style - STYLE_MARGIN
                and self.scores.accuracy >= self.lora.accuracy - ACC_MARGIN)


def run(style: str, grid=GRID, first_seed: int = FIRST_SEED, samples_per_class: int = 24,
        settings: Settings = Settings()):
    """Yields LoRA + CFG's scores, then one Row per setting of `grid`."""
    evaluators = Evaluators.load(EVALUATORS_PATHS[style])
    model, factors = load_lora_model(SCALE, lora_path=LORA_PATHS[style])
    labels, seeds = prompts(samples_per_class, first_seed=first_seed)
    lora = evaluators.score(sample_lora_cfg(model, labels, seeds, settings), labels)
    yield lora
    for name, controls in grid:
        controls = dict(controls)
        gamma = controls.pop("gamma")
        scores = evaluators.score(sample_autolora(model, factors, labels, seeds, gamma, settings, **controls), labels)
        yield Row(name, {"gamma": gamma, **controls}, scores, lora)


def format_row(r: Row) -> str:
    s = r.scores
    knobs = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.controls.items())
    return (f"{r.name:18s} {knobs:40s} | {s.diversity:7.4f} {r.gain:+7.3f} {s.style:5.2f} {s.accuracy:5.2f} | "
            f"{'yes' if r.recovers else 'no'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m research.controls", description=__doc__.splitlines()[0])
    parser.add_argument("--style", choices=SHIPPED_STYLES, action="append")
    parser.add_argument("--first-seed", type=int, default=FIRST_SEED)
    parser.add_argument("--samples", type=int, default=24, help="seeds per digit")
    parser.add_argument("--only", nargs="*", help="settings to run, by name and gamma: 'cap 0.5@2'")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    grid = GRID
    if args.only:
        grid = [(n, c) for n, c in GRID if f"{n}@{c['gamma']:g}" in args.only]
    for style in args.style or SHIPPED_STYLES:
        started = time.time()
        rows = run(style, grid, args.first_seed, args.samples)
        lora = next(rows)
        print(f"LoRA '{style}', scale {SCALE}, CFG 4, {args.samples} seeds x 10 digits from {args.first_seed}; "
              f"LoRA+CFG: diversity {lora.diversity:.4f}, style {lora.style:.2f}, accuracy {lora.accuracy:.2f}")
        print(f"{'setting':18s} {'':40s} |  divers.   gain  style  acc  | recovers variety "
              f"(gain >= {MIN_GAIN}, style >= -{STYLE_MARGIN}, acc >= -{ACC_MARGIN})", flush=True)
        results = []
        for row in rows:
            results.append(row)
            print(format_row(row), flush=True)
        print(f"'{style}': {sum(r.recovers for r in results)} of {len(results)} settings recover variety "
              f"({time.time() - started:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
