"""Whole-image benchmark of AutoLoRA in a running WebUI (A1111 or Forge), through its HTTP API.

For each case (checkpoint, LoRA, size, batch) it runs, interleaved round by round:
plain LoRA generation (AutoLoRA off), AutoLoRA with each base-branch strategy, and optionally
AutoLoRA with a 50 % guidance interval. Each AutoLoRA time is divided by the plain time *of the same round* (paired),
and medians over rounds are printed with the peak GPU memory of each call: the extension resets
torch's peak counter before the call (POST /autolora/v1/reset-peak) and the WebUI's own
GET /sdapi/v1/memory reads it afterwards, the same way for plain and AutoLoRA calls.

    python bench/webui_bench.py --url http://127.0.0.1:7861 \
        --case sd15-512-1:random-sd15.safetensors:random_lora:512:1 --rounds 5 --steps 20

`--smoke` runs one tiny round on a CPU: it checks that every variant returns an image, that the
base branch ran, and that a plain image after all variants is byte-identical to the one before.
It makes no timing claims. Standard library only, so it runs beside any WebUI.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import statistics
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

VARIANTS = ("plain", "auto", "batched", "dual", "sequential", "swap", "batched-interval50")


@dataclass
class Case:
    name: str
    checkpoint: str
    lora: str
    size: int
    batch: int


@dataclass
class Measurement:
    seconds: list = field(default_factory=list)
    ratios: list = field(default_factory=list)
    peak_bytes: list = field(default_factory=list)
    strategies: list = field(default_factory=list)  # what the extension ran (auto's pick)


def parse_case(text: str) -> Case:
    name, ckpt, lora, size, batch = text.split(":")
    return Case(name, ckpt, lora, int(size), int(batch))


def _http(url: str, payload=None, timeout=3600):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if payload is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def _optional(url, payload=None):
    try:
        return _http(url, payload, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 405):
            return None
        raise


def request_for(case: Case, variant: str, steps: int, seed: int, sampler: str) -> dict:
    req = {"prompt": f"a photo of a cat <lora:{case.lora}:1>", "negative_prompt": "blurry",
           "steps": steps, "sampler_name": sampler, "cfg_scale": 7, "seed": seed,
           "width": case.size, "height": case.size, "batch_size": case.batch, "n_iter": 1,
           "override_settings": {"sd_model_checkpoint": case.checkpoint},
           "override_settings_restore_afterwards": False}
    if variant == "floor":
        # Plain generation of twice the batch: its per-step time (bench/host_steps.py) is the floor
        # of any strategy that runs both branches in one forward. Its whole-image time is not
        # comparable (twice the images to decode).
        req["batch_size"] = case.batch * 2
    elif variant != "plain":
        strategy, _, interval = variant.partition("-")
        args = {"enabled": True, "gamma": 1.5, "strategy": strategy}
        if interval == "interval50":
            args.update(start=0.0, end=0.5)
        req["alwayson_scripts"] = {"AutoLoRA": {"args": [args]}}
    return req


def peak_allocated(memory) -> "int | None":
    """torch's peak allocated bytes from the WebUI's GET /sdapi/v1/memory answer (None on a CPU)."""
    cuda = (memory or {}).get("cuda") or {}
    peak = (cuda.get("allocated") or {}).get("peak")
    return int(peak) if isinstance(peak, (int, float)) else None


def check_model(req: dict, info) -> None:
    """The WebUI drops a checkpoint override it cannot resolve and keeps the loaded model; a case
    timed on the wrong model must fail loudly, not print plausible numbers."""
    want = req.get("override_settings", {}).get("sd_model_checkpoint")
    try:
        got = json.loads(info).get("sd_model_name") if isinstance(info, str) else None
    except ValueError:
        got = None
    if want and got is not None and got != want.rsplit(".", 1)[0]:
        raise RuntimeError(f"the WebUI generated with {got!r}, not the case's checkpoint {want!r}")


def run_one(url: str, req: dict):
    """(seconds, sha256 of the first image, diagnostics of the extension or None, peak bytes or None).
    The peak is this call's only when the extension could reset torch's counter first (its
    diagnostic route, with AUTOLORA_DIAGNOSTICS=1): otherwise it is None, not the process's peak."""
    reset = _optional(f"{url}/autolora/v1/reset-peak", {})
    t0 = time.perf_counter()
    out = _http(f"{url}/sdapi/v1/txt2img", req)
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256(base64.b64decode(out["images"][0])).hexdigest()
    check_model(req, out.get("info"))
    stats = _optional(f"{url}/autolora/v1/stats") if "alwayson_scripts" in req else None
    return seconds, digest, stats, peak_allocated(_optional(f"{url}/sdapi/v1/memory")) if reset else None


def paired_ratios(plain: list, other: list) -> list:
    """Round-by-round ratios, so drift of the machine's speed cancels out."""
    return [o / p for p, o in zip(plain, other)]


def summarize(results: dict) -> list:
    """results[case][variant] = Measurement -> table rows (case, variant, median s, ratio, peak GiB, peak %)."""
    rows = []
    for case, by_variant in results.items():
        plain = by_variant.get("plain")
        plain_peak = statistics.median(plain.peak_bytes) if plain and plain.peak_bytes else None
        for variant, m in by_variant.items():
            peak = statistics.median(m.peak_bytes) if m.peak_bytes else None
            rows.append({
                "case": case, "variant": variant, "ran": sorted(set(m.strategies)),
                "median_s": statistics.median(m.seconds) if m.seconds else None,
                "ratio": 1.0 if variant == "plain" else (statistics.median(m.ratios) if m.ratios else None),
                "peak_gib": None if peak is None else peak / 2 ** 30,
                "peak_over_plain_pct": None if peak is None or not plain_peak else 100 * (peak / plain_peak - 1),
            })
    return rows


def format_table(rows: list) -> str:
    f = lambda v, fmt: "n/a" if v is None else format(v, fmt)
    lines = ["| case | variant | median s | × plain (paired median) | peak GiB | peak vs plain |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ran = r.get("ran") or []
        variant = r["variant"] + (f" (ran {', '.join(ran)})" if r["variant"].startswith("auto") and ran else "")
        lines.append(f"| {r['case']} | {variant} | {f(r['median_s'], '.2f')} | {f(r['ratio'], '.2f')}× | "
                     f"{f(r['peak_gib'], '.2f')} | {f(r['peak_over_plain_pct'], '+.1f')} % |")
    return "\n".join(lines)


def benchmark(url, cases, variants, rounds, steps, sampler, warmup=1, log=print, warmup_variants=None,
              on_round=None):
    """Rounds of every variant per case; `warmup_variants` (default: all) run in the warm-up rounds;
    `on_round(results)` is called after each round, so a run cut short still leaves its data."""
    results = {c.name: {v: Measurement() for v in variants} for c in cases}
    for case in cases:
        for r in range(warmup + rounds):
            # Rotate the order each round so no variant always runs right after another.
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            if r < warmup and warmup_variants is not None:
                order = [v for v in order if v in warmup_variants]
            times = {}
            for variant in order:
                seconds, _digest, stats, peak = run_one(url, request_for(case, variant, steps, 1000 + r, sampler))
                times[variant] = seconds
                if r >= warmup:
                    m = results[case.name][variant]
                    m.seconds.append(seconds)
                    if peak is not None:
                        m.peak_bytes.append(peak)
                    if stats and stats.get("strategy"):
                        m.strategies.append(stats["strategy"])
                details = [f"{seconds:.2f} s"]
                if peak is not None:
                    details.append(f"peak {peak / 2 ** 30:.2f} GiB")
                if stats:
                    details.append(f"ran {stats.get('strategy')}, base calls {stats.get('base_calls')}, "
                                   f"set-up {stats.get('strategy_setup_ms')} ms, GC {stats.get('gc_ms')} ms "
                                   f"({stats.get('gc_full_collections')} full)")
                log(f"{case.name} round {r}{' (warm-up)' if r < warmup else ''} {variant}: {', '.join(details)}")
            if r >= warmup and "plain" in times:
                for variant in variants:
                    if variant != "plain":
                        results[case.name][variant].ratios.append(times[variant] / times["plain"])
            if r >= warmup and on_round is not None:
                on_round(results)
    return results


def smoke(url, case, steps, sampler, log=print) -> int:
    """Correctness only: every variant answers, the base branch ran, plain images are unchanged."""
    failures = 0
    _, before, _, _ = run_one(url, request_for(case, "plain", steps, 7, sampler))
    for variant in VARIANTS[1:]:
        try:
            seconds, digest, stats, _ = run_one(url, request_for(case, variant, steps, 7, sampler))
        except urllib.error.HTTPError as exc:
            log(f"FAIL {variant}: HTTP {exc.code} {exc.read()[:300]!r}")
            failures += 1
            continue
        ran = None if stats is None else stats.get("base_calls")
        ok = digest != before and (ran is None or ran > 0)
        failures += not ok
        log(f"{'ok  ' if ok else 'FAIL'} {variant}: {seconds:.1f} s, base-branch calls {ran}, "
            f"strategy {None if stats is None else stats.get('strategy')}")
    _, after, _, _ = run_one(url, request_for(case, "plain", steps, 7, sampler))
    same = after == before
    failures += not same
    log(f"{'ok  ' if same else 'FAIL'} plain image byte-identical after all variants: {same}")
    log(f"{len(VARIANTS) - failures} passed, {failures} failed")
    return failures


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:7861")
    ap.add_argument("--case", action="append", type=parse_case, required=True,
                    help="name:checkpoint:lora:size:batch (repeatable)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="Euler")
    ap.add_argument("--smoke", action="store_true", help="one tiny correctness round, no timing claims")
    ap.add_argument("--warmup-variants", help="comma-separated variants for the warm-up rounds (default: all)")
    ap.add_argument("--json", help="also write the raw results here (rewritten after every round)")
    args = ap.parse_args(argv)
    if args.smoke:
        return 1 if smoke(args.url, args.case[0], args.steps, args.sampler) else 0
    variants = [v for v in args.variants.split(",") if v]
    if "plain" not in variants:
        variants.insert(0, "plain")
    warmup_variants = None if not args.warmup_variants else set(args.warmup_variants.split(","))

    def save(results):
        rows = summarize(results)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"steps": args.steps, "sampler": args.sampler, "rows": rows,
                           "raw": {c: {v: m.__dict__ for v, m in vs.items()} for c, vs in results.items()}},
                          fh, indent=1)
        return rows

    results = benchmark(args.url, args.case, variants, args.rounds, args.steps, args.sampler, args.warmup,
                        warmup_variants=warmup_variants, on_round=save)
    print(format_table(save(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
