"""Does any AutoLoRA setting reach a style/diversity point that LoRA + CFG cannot reach?

    python -m research.pareto

The most generous reading of the paper's claim. `demo.front` matches AutoLoRA against LoRA + CFG
at the *same* CFG; here the baseline may pick any LoRA scale *and* any CFG, and AutoLoRA any
gamma, LoRA scale, w1 and w2. An AutoLoRA setting is "beyond the front" when no LoRA + CFG
setting shows the same style with at least its diversity at about its accuracy: only then does
gamma give the user something that the LoRA's strength and the CFG slider do not.

How each AutoLoRA point P (style, diversity, accuracy) is judged:
1. LoRA + CFG is sampled over BASELINE_SCALES for each of BASELINE_CFGS: one curve per CFG.
2. On each curve, the matched scale is where its style first reaches P's style less STYLE_TOLERANCE
   (`front.matched_scale`, linear between neighbouring scales); the curve's diversity and accuracy
   are interpolated there. CFGs whose curve never reaches P's style, or whose interpolated accuracy
   is more than ACC_MARGIN below P's, are out. Of the CFGs left, the one with the highest
   interpolated diversity is *sampled* at its matched scale: the "matched" answer.
3. Every sampled curve point with at least P's style (less the tolerance) and an accuracy within
   ACC_MARGIN of P's is an answer too (a curve's accuracy is not monotone in the LoRA scale, so a
   higher scale than the first crossing can answer P when the crossing cannot).
4. P beats an answer when it is more diverse and no more than ACC_MARGIN less accurate. P is
   beyond the front when it beats every answer, or when there is none.
Step 2 samples one interpolated candidate only; a CFG not sampled at its crossing might beat P,
so this errs in AutoLoRA's favour, never against it.

The first run of this command judged with steps 1, 2 and 4 only (docs/demo.md says what step 3
changed).

Only points with accuracy >= MIN_ACCURACY are judged: diversity from misdrawn digits is not the
diversity the paper means. The grid and seeds are declared here before any of it was run, and the
command prints every point.
"""
from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from demo.__main__ import (EVALUATORS_PATHS, LORA_PATH, LORA_PATHS, Settings, load_lora_model, prompts,
                       sample_autolora, sample_lora_cfg)
from research.front import ACC_MARGIN, matched_scale, wins as beats  # beats: more diverse, accuracy within the margin
from demo.metrics import Evaluators, Scores
from research.sweep import stream_rows
from demo.train import SHIPPED_STYLES

BASELINE_CFGS = (1.5, 2.0, 3.0, 4.0, 5.0, 7.0)
BASELINE_SCALES = tuple(round(0.1 * i, 1) for i in range(1, 15))  # 0.1 .. 1.4
GAMMAS = (1.25, 1.5, 2.0)
AUTO_SCALES = (0.4, 0.6, 0.8, 1.0)
W1S = (1.0, 2.0, 4.0, 7.0)
W2S = (2.0, 4.0, 7.0)
MIN_ACCURACY = 0.9  # points below are printed but not judged
STYLE_TOLERANCE = 0.01  # of 5: "the same style"; without it a point at 4.999 outruns curves that top at 4.995
FIRST_SEED = 13000  # used nowhere else (demo 1000, tests 5000, sweep 7000, front 9000, metric_check 11000)

Curve = Sequence[tuple[float, Scores]]  # [(LoRA scale, scores)] in increasing scale


def interpolate(curve: Curve, scale: float) -> Scores:
    """The curve's scores at `scale`, linear between the neighbouring sampled scales."""
    for (s0, a), (s1, b) in zip(curve, curve[1:]):
        if s0 <= scale <= s1:
            t = 0.0 if s1 == s0 else (scale - s0) / (s1 - s0)
            mix = lambda u, v: u + t * (v - u)
            return Scores(mix(a.diversity, b.diversity), mix(a.style, b.style), mix(a.accuracy, b.accuracy))
    edge = curve[0] if scale <= curve[0][0] else curve[-1]
    return edge[1]


@dataclass(frozen=True)
class Answer:
    """LoRA + CFG's best answer to one AutoLoRA point: at this CFG and LoRA scale."""
    cfg: float
    scale: float
    interpolated: Scores


def best_answer(curves: dict[float, Curve], point: Scores, acc_margin: float = ACC_MARGIN) -> Optional[Answer]:
    """Of the CFGs whose curve reaches the point's style at an accuracy within the margin, the one
    with the highest interpolated diversity there; None when no CFG qualifies."""
    best = None
    for cfg, curve in curves.items():
        at = matched_scale([(s, sc.style) for s, sc in curve], point.style - STYLE_TOLERANCE)
        if at is None:
            continue
        there = interpolate(curve, at)
        if there.accuracy < point.accuracy - acc_margin:
            continue
        if best is None or there.diversity > best.interpolated.diversity:
            best = Answer(cfg, at, there)
    return best


@dataclass(frozen=True)
class Candidate:
    """A measured LoRA + CFG setting that may answer an AutoLoRA point."""
    cfg: float
    scale: float
    scores: Scores
    kind: str  # "matched": sampled at the interpolated answer; "curve": a sampled point of a curve


def curve_candidates(curves: dict[float, Curve], point: Scores, acc_margin: float = ACC_MARGIN) -> list[Candidate]:
    """Every sampled curve point that shows at least the point's style (less the tolerance) at an
    accuracy within the margin. The interpolated answer takes the first crossing of each curve;
    a curve's accuracy is not monotone in the LoRA scale (half-styled digits are misread), so a
    higher scale on the same curve can answer a point that its first crossing cannot."""
    return [Candidate(cfg, scale, scores, "curve") for cfg, curve in curves.items() for scale, scores in curve
            if scores.style >= point.style - STYLE_TOLERANCE and scores.accuracy >= point.accuracy - acc_margin]


def strongest(point: Scores, candidates: Sequence[Candidate]) -> Optional[Candidate]:
    """The candidate to show against the point: the most diverse one it does not beat, else the
    most diverse one; None without candidates."""
    unbeaten = [c for c in candidates if not beats(point, c.scores)]
    pool = unbeaten or list(candidates)
    return max(pool, key=lambda c: c.scores.diversity) if pool else None


@dataclass(frozen=True)
class Point:
    gamma: float
    scale: float
    w1: float
    w2: float
    auto: Scores
    candidates: tuple = ()  # measured LoRA + CFG answers; empty when not judged or none qualifies

    @property
    def judged(self) -> bool:
        return self.auto.accuracy >= MIN_ACCURACY

    @property
    def beyond(self) -> bool:
        """Beyond LoRA + CFG's front: it beats every measured answer (or none exists)."""
        return self.judged and all(beats(self.auto, c.scores) for c in self.candidates)

    @property
    def shown(self) -> Optional[Candidate]:
        return strongest(self.auto, self.candidates)


def baseline_curves(evaluators: Evaluators, labels, seeds, cfgs: Sequence[float], scales: Sequence[float],
                    settings: Settings, lora_path=LORA_PATH) -> dict[float, list]:
    curves = {cfg: [] for cfg in cfgs}
    for scale in scales:
        model, _ = load_lora_model(scale, lora_path=lora_path)
        for cfg in cfgs:
            images = sample_lora_cfg(model, labels, seeds, replace(settings, cfg=cfg))
            curves[cfg].append((scale, evaluators.score(images, labels)))
    return curves


def run(evaluators: Evaluators, samples_per_class: int = 24, baseline_cfgs=BASELINE_CFGS,
        baseline_scales=BASELINE_SCALES, gammas=GAMMAS, scales=AUTO_SCALES, w1s=W1S, w2s=W2S,
        settings: Settings = Settings(), curves: Optional[dict] = None, first_seed: int = FIRST_SEED,
        lora_path=LORA_PATH):
    """Yields one Point per (gamma, AutoLoRA's LoRA scale, w1, w2), in the grid's order. The
    baseline curves are sampled first (or passed in, sampled on the same seeds)."""
    labels, seeds = prompts(samples_per_class, first_seed=first_seed)
    if curves is None:
        curves = baseline_curves(evaluators, labels, seeds, baseline_cfgs, baseline_scales, settings, lora_path)
    measured_at: dict[tuple[float, float], Scores] = {}
    for scale in scales:
        model, factors = load_lora_model(scale, lora_path=lora_path)
        for gamma, w1, w2 in itertools.product(gammas, w1s, w2s):
            # with w1 and w2 given, settings.cfg is used only outside a guidance interval (none here)
            images = sample_autolora(model, factors, labels, seeds, gamma, replace(settings, cfg=w2), w1=w1, w2=w2)
            auto = evaluators.score(images, labels)
            candidates = []
            if auto.accuracy >= MIN_ACCURACY:
                answer = best_answer(curves, auto)
                if answer is not None:
                    key = (answer.cfg, round(answer.scale, 4))
                    if key not in measured_at:
                        lora_model, _ = load_lora_model(key[1], lora_path=lora_path)
                        measured_at[key] = evaluators.score(
                            sample_lora_cfg(lora_model, labels, seeds, replace(settings, cfg=answer.cfg)), labels)
                    candidates.append(Candidate(answer.cfg, answer.scale, measured_at[key], "matched"))
                candidates += curve_candidates(curves, auto)
            yield Point(gamma, scale, w1, w2, auto, tuple(candidates))


HEADER = ("gamma scale   w1   w2 |  AutoLoRA+CFG        | LoRA+CFG's strongest answer (measured) | beyond\n"
          "                      |  Div   Style   Acc   |  cfg scale   Div   Style   Acc   from  | front")


def format_point(p: Point) -> str:
    fmt = lambda s: f"{s.diversity:6.4f} {s.style:5.2f} {s.accuracy:5.2f}"
    shown = p.shown
    if not p.judged:
        answer = f"{'(not judged: Acc < ' + str(MIN_ACCURACY) + ')':38s}"
    elif shown is None:
        answer = f"{'(no LoRA+CFG setting reaches this style)':38s}"
    else:
        answer = f"{shown.cfg:4g} {shown.scale:5.3f} {fmt(shown.scores)} {shown.kind:7s}"
    verdict = "-" if not p.judged else ("yes" if p.beyond else "no")
    return f"{p.gamma:5g} {p.scale:5.2f} {p.w1:4g} {p.w2:4g} | {fmt(p.auto)}   | {answer} | {verdict}"


def format_curves(curves: dict) -> str:
    """LoRA + CFG's measured curves, one line per CFG: scale: Div/Style/Acc."""
    lines = ["LoRA+CFG curves (scale: Div Style Acc)"]
    for cfg, curve in curves.items():
        cells = "  ".join(f"{s:.1f}: {sc.diversity:.4f} {sc.style:.2f} {sc.accuracy:.2f}" for s, sc in curve)
        lines.append(f"  cfg {cfg:g} | {cells}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m research.pareto", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=24, help="samples per digit class and cell")
    parser.add_argument("--gammas", type=float, nargs="+", default=list(GAMMAS))
    parser.add_argument("--scales", type=float, nargs="+", default=list(AUTO_SCALES))
    parser.add_argument("--w1s", type=float, nargs="+", default=list(W1S))
    parser.add_argument("--w2s", type=float, nargs="+", default=list(W2S))
    parser.add_argument("--first-seed", type=int, default=FIRST_SEED,
                        help="seeds first_seed .. first_seed + samples - 1 for every digit; "
                             "another range re-checks a result")
    parser.add_argument("--style", default=SHIPPED_STYLES[0], choices=SHIPPED_STYLES, help="which shipped LoRA")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    evaluators = Evaluators.load(EVALUATORS_PATHS[args.style])
    lora_path = LORA_PATHS[args.style]
    labels, seeds = prompts(args.samples, first_seed=args.first_seed)
    curves = baseline_curves(evaluators, labels, seeds, BASELINE_CFGS, BASELINE_SCALES, Settings(), lora_path)
    print(f"LoRA {args.style!r}: AutoLoRA+CFG against LoRA+CFG at any LoRA scale and CFG, "
          f"{Settings.sampler} {Settings.steps} "
          f"steps, {args.samples} seeds ({args.first_seed}-{args.first_seed + args.samples - 1}) x 10 digits per cell; "
          f"beyond front = no LoRA+CFG setting matches "
          f"its style with at least its Diversity at Acc within {ACC_MARGIN}; judged when Acc >= {MIN_ACCURACY}")
    print(format_curves(curves), flush=True)
    points = stream_rows(HEADER, run(evaluators, args.samples, gammas=args.gammas, scales=args.scales, w1s=args.w1s,
                                     w2s=args.w2s, curves=curves, first_seed=args.first_seed, lora_path=lora_path),
                         format_point)
    judged = [p for p in points if p.judged]
    print(f"judged {len(judged)} of {len(points)} AutoLoRA points; beyond LoRA+CFG's front: "
          f"{sum(p.beyond for p in judged)} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
