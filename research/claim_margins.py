"""How much does the demo's claim vary from one set of seeds to the next? The margins of the quality
test, measured before they were declared.

    python -m research.claim_margins

The quality test (tests/test_demo.py) asks, on the shipped 'bold' LoRA at LoRA scale 1.0, CFG 4,
dpmpp_2m 20 steps: is AutoLoRA (gamma 1.5) more diverse than LoRA + CFG, and at what cost in class
accuracy? This runs the very same comparison on other seed sets (from 21000 in steps of 1000; used
nowhere else) and prints, per set, the relative diversity gain (AutoLoRA / LoRA + CFG - 1), the
style change and the accuracy change, then their mean and standard deviation. The test's margins
are mean - 2 sd for the gain (a smaller gain is within what a draw of seeds gives) and mean + 2 sd
for the accuracy loss, at the test's number of seeds per digit.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from demo.__main__ import EVALUATORS_PATHS, LORA_PATHS, Settings, load_lora_model, prompts, sample_autolora, sample_lora_cfg
from demo.metrics import Evaluators

SCALE, GAMMA, STYLE = 1.0, 1.5, "bold"


def measure(evaluators: Evaluators, first_seed: int, seeds_per_class: int, settings: Settings = Settings()) -> tuple:
    """(relative diversity gain, style change, accuracy change) of AutoLoRA over LoRA + CFG."""
    model, factors = load_lora_model(SCALE, lora_path=LORA_PATHS[STYLE])
    labels, seeds = prompts(seeds_per_class, first_seed=first_seed)
    lora = evaluators.score(sample_lora_cfg(model, labels, seeds, settings), labels)
    auto = evaluators.score(sample_autolora(model, factors, labels, seeds, GAMMA, settings), labels)
    return auto.diversity / lora.diversity - 1.0, auto.style - lora.style, auto.accuracy - lora.accuracy, lora, auto


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m research.claim_margins", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds-per-class", type=int, default=24)
    parser.add_argument("--sets", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    evaluators = Evaluators.load(EVALUATORS_PATHS[STYLE])
    started = time.time()
    print(f"LoRA '{STYLE}', scale {SCALE}, gamma {GAMMA}, {args.seeds_per_class} seeds x 10 digits per set")
    print("first seed | LoRA+CFG div  acc  | AutoLoRA div  acc  | div gain  style   acc")
    gains, styles, accs = [], [], []
    for first in range(21000, 21000 + 1000 * args.sets, 1000):
        gain, style, acc, lora, auto = measure(evaluators, first, args.seeds_per_class)
        gains.append(gain)
        styles.append(style)
        accs.append(acc)
        print(f"{first:10d} | {lora.diversity:8.4f} {lora.accuracy:5.2f} | {auto.diversity:8.4f} {auto.accuracy:5.2f} |"
              f" {gain:+8.3f} {style:+6.2f} {acc:+6.3f}", flush=True)
    for name, values in (("diversity gain", gains), ("style change", styles), ("accuracy change", accs)):
        print(f"{name}: mean {statistics.mean(values):+.4f}, sd {statistics.stdev(values):.4f}")
    min_gain = statistics.mean(gains) - 2 * statistics.stdev(gains)
    max_loss = -statistics.mean(accs) + 2 * statistics.stdev(accs)
    print(f"margins (mean -/+ 2 sd): diversity gain >= {min_gain:+.3f}, accuracy loss <= {max_loss:.3f} "
          f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
