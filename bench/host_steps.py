"""Per-step time of each benchmark request, read from the WebUI's own sampler progress bar.

webui_bench.py times whole images; the WebUI's log also holds, per request, tqdm's sampler bar
(`100%|...| 20/20 [00:01<00:00, 16.05it/s]`), whose final rate is tqdm's smoothed recent rate, so
it leaves out the first step's one-time work. Pairing it with the bench's own log (one line per
request, in order) splits each image into steps and the rest:

    python bench/host_steps.py --host-log forge.log --bench-log bench.log

Requests are matched in order: the host prints one `POST /sdapi/v1/txt2img` access line per
request when it answers, after that request's bars. The "Total progress" bar is the job's, not the
sampler's, and is skipped (the two share lines: see shared/webui/GPU.md, pitfall 11).
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import defaultdict

ACCESS_LINE = re.compile(r"POST /sdapi/v1/txt2img HTTP/1\.1")
SAMPLER_BAR = re.compile(r"(?<!Total progress: )100%\|[^|]*\| (\d+)/\1 \[[^\]]*?([\d.]+)(it/s|s/it)\]")
BENCH_LINE = re.compile(r"^(\S+) round \d+( \(warm-up\))? (\S+): ([\d.]+) s")


def seconds_per_step(host_log: str) -> list:
    """One entry per answered txt2img request: seconds per step of its last finished sampler bar
    (None if it printed none)."""
    out = []
    for span in ACCESS_LINE.split(host_log)[:-1]:
        rate = None
        for _steps, value, unit in SAMPLER_BAR.findall(span):
            rate = 1 / float(value) if unit == "it/s" else float(value)
        out.append(rate)
    return out


def bench_requests(bench_log: str) -> list:
    """(case, variant, warm-up?, whole seconds) per request line of webui_bench.py's log."""
    rows = []
    for line in bench_log.splitlines():
        m = BENCH_LINE.match(line)
        if m:
            rows.append((m.group(1), m.group(3), bool(m.group(2)), float(m.group(4))))
    return rows


def per_step_table(host_log: str, bench_log: str, steps: int = 20) -> list:
    """Median ms/step, its ratio to plain, whole seconds, and seconds outside the sampling loop,
    per (case, variant), timed rounds only."""
    rates, requests = seconds_per_step(host_log), bench_requests(bench_log)
    if len(rates) != len(requests):
        raise ValueError(f"{len(rates)} answered requests in the host log, {len(requests)} in the bench log")
    by = defaultdict(list)
    for (case, variant, warm, whole), per_step in zip(requests, rates):
        if not warm and per_step is not None:
            by[(case, variant)].append((per_step, whole))
    rows = []
    for (case, variant), values in by.items():
        ms = 1000 * statistics.median(v[0] for v in values)
        whole = statistics.median(v[1] for v in values)
        rows.append({"case": case, "variant": variant, "ms_per_step": ms, "whole_s": whole,
                     "outside_loop_s": whole - steps * ms / 1000})
    for row in rows:
        plain = next((r["ms_per_step"] for r in rows if r["case"] == row["case"] and r["variant"] == "plain"), None)
        row["per_step_vs_plain"] = None if not plain else row["ms_per_step"] / plain
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host-log", required=True)
    ap.add_argument("--bench-log", required=True)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    with open(args.host_log, errors="replace") as h, open(args.bench_log) as b:
        rows = per_step_table(h.read(), b.read(), args.steps)
    print("| case | variant | ms/step | × plain per step | whole s | outside the loop s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = "n/a" if r["per_step_vs_plain"] is None else f"{r['per_step_vs_plain']:.2f}×"
        print(f"| {r['case']} | {r['variant']} | {r['ms_per_step']:.1f} | {ratio} | {r['whole_s']:.2f} | "
              f"{r['outside_loop_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
