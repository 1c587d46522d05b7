"""Does AutoLoRA buy diversity at the same style? LoRA + CFG and AutoLoRA + CFG matched on style.

    python -m research.front

The demo's table and `demo.sweep` compare the two at the same LoRA scale, as the paper's Table 1
does. But gamma > 1 also strengthens the style, and a user who wants more variety can simply turn
the LoRA down. So this asks the question a user would: for each AutoLoRA setting, find the LoRA
scale at which plain LoRA + CFG (same CFG, same seeds) shows the *same* style presence, sample
LoRA + CFG there, and compare diversity. AutoLoRA "wins" a row when it is more diverse than that
matched LoRA + CFG and at least as accurate (within ACC_MARGIN): only then does it reach a point
that turning the LoRA down does not.

How the match is found: LoRA + CFG is sampled over CURVE_SCALES; the matched scale is where that
curve's style, linearly interpolated between neighbouring scales, first reaches AutoLoRA's style;
LoRA + CFG is then sampled *at* that scale, so the compared numbers are measured, not
interpolated, and the printed style shows how close the match came. The grid (CFG scales,
gammas, AutoLoRA's LoRA scales, the curve, the seeds) is declared here before any of it was run,
and the command prints every row.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from demo.__main__ import Settings, load_lora_model, prompts, sample_autolora, sample_lora_cfg
from demo.metrics import Evaluators, Scores
from research.sweep import TIE, stream_rows

CFGS = (2.0, 4.0, 7.0)  # w1 = w2 = CFG in AutoLoRA, CFG in LoRA + CFG
GAMMAS = (1.25, 1.5, 2.0)
AUTO_SCALES = (0.4, 0.6, 0.8, 1.0)
CURVE_SCALES = tuple(round(0.1 * i, 1) for i in range(1, 15))  # 0.1 .. 1.4
ACC_MARGIN = 0.05  # accuracy AutoLoRA may lose against the matched LoRA + CFG and still "win"
# A style this close to a curve point counts as that point. The same samples scored on two paths
# (AutoLoRA at gamma 1 and LoRA + CFG) differ by float rounding alone: ~1e-6 on one CPU, 4e-6 seen on
# another (other BLAS kernels); styles that matter differ by 0.01 or more.
STYLE_TIE = 1e-4
FIRST_SEED = 9000  # not the demo's (1000), the tests' (5000) nor the sweep's (7000)


def matched_scale(curve: Sequence[tuple[float, float]], style: float) -> Optional[float]:
    """curve: [(LoRA scale, style)] in increasing scale. The first scale at which the piecewise
    linear curve reaches `style` (within STYLE_TIE), or None if it never does."""
    target = style - STYLE_TIE
    for (s0, y0), (s1, y1) in zip(curve, curve[1:]):
        if y0 >= target:
            return s0
        if y1 >= target:
            return s1 if y1 <= style + STYLE_TIE else s0 + (s1 - s0) * (style - y0) / (y1 - y0)
    if curve and curve[-1][1] >= target:
        return curve[-1][0]
    return None


def wins(auto: Scores, matched: Scores, acc_margin: float = ACC_MARGIN) -> bool:
    """AutoLoRA beats LoRA + CFG at the same style: more diverse and no less accurate."""
    return auto.diversity > matched.diversity + TIE and auto.accuracy >= matched.accuracy - acc_margin


@dataclass(frozen=True)
class Row:
    cfg: float
    gamma: float
    scale: float
    auto: Scores
    matched_scale: Optional[float]  # None: LoRA + CFG never reaches AutoLoRA's style on the curve
    matched: Optional[Scores]

    @property
    def wins(self) -> bool:
        return self.matched is not None and wins(self.auto, self.matched)


def _lora_cfg_scores(evaluators, scale, labels, seeds, settings) -> Scores:
    model, _ = load_lora_model(scale)
    return evaluators.score(sample_lora_cfg(model, labels, seeds, settings), labels)


def run(evaluators: Evaluators, cfgs: Sequence[float] = CFGS, gammas: Sequence[float] = GAMMAS,
        scales: Sequence[float] = AUTO_SCALES, curve_scales: Sequence[float] = CURVE_SCALES,
        samples_per_class: int = 24, settings: Settings = Settings()):
    """Yields one Row per (CFG, gamma, AutoLoRA's LoRA scale), in the grid's order."""
    labels, seeds = prompts(samples_per_class, first_seed=FIRST_SEED)
    for w in cfgs:
        s = replace(settings, cfg=w)
        curve = [(c, _lora_cfg_scores(evaluators, c, labels, seeds, s).style) for c in curve_scales]
        for gamma in gammas:
            for scale in scales:
                model, factors = load_lora_model(scale)
                auto = evaluators.score(sample_autolora(model, factors, labels, seeds, gamma, s), labels)
                at = matched_scale(curve, auto.style)
                matched = None if at is None else _lora_cfg_scores(evaluators, at, labels, seeds, s)
                yield Row(w, gamma, scale, auto, at, matched)


HEADER = ("cfg gamma scale |  AutoLoRA+CFG        | matched LoRA+CFG            | AutoLoRA\n"
          "                |  Div   Style   Acc   | scale  Div   Style   Acc    | wins")


def format_row(r: Row) -> str:
    fmt = lambda s: f"{s.diversity:6.4f} {s.style:5.2f} {s.accuracy:5.2f}"
    matched = "  (never reaches this style)  " if r.matched is None else f"{r.matched_scale:5.3f} {fmt(r.matched)} "
    return f"{r.cfg:3g} {r.gamma:5g} {r.scale:5.2f} | {fmt(r.auto)}   | {matched} | {'yes' if r.wins else 'no'}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m research.front", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=24, help="samples per digit class and cell")
    parser.add_argument("--cfgs", type=float, nargs="+", default=list(CFGS))
    parser.add_argument("--gammas", type=float, nargs="+", default=list(GAMMAS))
    parser.add_argument("--scales", type=float, nargs="+", default=list(AUTO_SCALES))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    print(f"AutoLoRA+CFG vs LoRA+CFG at the LoRA scale that matches its style, {Settings.sampler} "
          f"{Settings.steps} steps, {args.samples} seeds x 10 digits per cell; wins = higher Diversity, "
          f"Acc within {ACC_MARGIN}")
    rows = stream_rows(HEADER, run(Evaluators.load(), args.cfgs, args.gammas, args.scales,
                                   samples_per_class=args.samples), format_row)
    print(f"AutoLoRA wins {sum(r.wins for r in rows)} of {len(rows)} rows ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
