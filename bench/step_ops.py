"""Operator calls and kernel launches per sampling step, per variant, in a running WebUI.

`host_steps.py` says how long a step takes; this says what it is made of. It switches on the
WebUI's own profiler (A1111/Forge setting "Enable profiling": torch.profiler around the whole
generation, written as a Chrome trace), generates each variant at two step counts and takes the
difference, so everything outside the sampling loop (text encoding, VAE, model moves) cancels and
what is left is exactly one step's work, counted rather than timed:

    aten ops   operator calls through the dispatcher (each costs CPU time; a launch-bound step is
               their sum)
    launches   CUDA kernel launches (cudaLaunchKernel and its variants); 0 on a CPU
    op ms      profiled CPU time of the top-level operator calls (inflated by the profiler: compare
               variants with each other, never with host_steps' times)
    GPU ms     time the GPU spent in kernels (with --cuda): against the step's time, whether the
               step waits for the GPU or the GPU waits for the CPU
    sync ms    time the CPU spent blocked in CUDA runtime calls that wait for the GPU
               (synchronizations, and copies to or from pageable host memory)

and, per variant, the operators whose calls per step differ most from `plain`. The WebUI must run
on this machine (the trace is read from the file it writes). Profiling is switched off again at
the end. Standard library only.

    python bench/step_ops.py --url http://127.0.0.1:7861 \
        --case sd15-512-1:rand_sd15.safetensors:rank32_sd15:512:1 --variants plain,floor,batched,dual
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from webui_bench import _http, parse_case, request_for  # noqa: E402

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
# Runtime calls that block the CPU until the GPU catches up (a memcpy does when host memory is
# pageable or the copy is device-to-host).
BLOCKING = ("Synchronize", "cudaMemcpy")


def trace_counts(path: str) -> dict:
    """Per-name counts of operator calls and launches, and top-level operator CPU time, of a trace."""
    with open(path) as f:
        events = json.load(f)
    events = events.get("traceEvents", []) if isinstance(events, dict) else events
    ops, launches, top_us, gpu_us, sync_us = collections.Counter(), 0, 0.0, 0.0, 0.0
    runtime = collections.Counter()  # runtime call name -> microseconds
    kernels = collections.Counter()  # kernel name -> microseconds on the GPU
    blocking = 0
    # Top-level ops: a cpu_op not inside another cpu_op of the same thread (the trace's intervals nest).
    by_thread = collections.defaultdict(list)
    for e in events:
        cat, name = e.get("cat"), e.get("name", "")
        if cat == "cpu_op" and name.startswith("aten::"):
            ops[name] += 1
            by_thread[e.get("tid")].append((float(e.get("ts", 0)), float(e.get("dur", 0))))
        elif cat == "cuda_runtime":
            launches += name in LAUNCHES
            runtime[name] += float(e.get("dur", 0))
            if any(b in name for b in BLOCKING):
                sync_us += float(e.get("dur", 0))
                blocking += 1
        elif cat == "kernel":
            gpu_us += float(e.get("dur", 0))
            kernels[name[:60]] += float(e.get("dur", 0))
    for spans in by_thread.values():
        spans.sort()
        end = -1.0
        for ts, dur in spans:
            if ts >= end:
                top_us += dur
                end = ts + dur
    return {"ops": ops, "launches": launches, "top_ms": top_us / 1000.0, "gpu_ms": gpu_us / 1000.0,
            "sync_ms": sync_us / 1000.0, "blocking": blocking, "runtime": runtime, "kernels": kernels}


def per_step(low: dict, high: dict, steps: int) -> dict:
    """What one step adds: (high - low) / steps, for counts made at n and n + steps steps."""
    ops = {name: (high["ops"].get(name, 0) - low["ops"].get(name, 0)) / steps
           for name in set(high["ops"]) | set(low["ops"])}
    runtime = {name: (high["runtime"].get(name, 0) - low["runtime"].get(name, 0)) / steps / 1000.0
               for name in set(high["runtime"]) | set(low["runtime"])}
    kernels = {name: (high["kernels"].get(name, 0) - low["kernels"].get(name, 0)) / steps / 1000.0
               for name in set(high["kernels"]) | set(low["kernels"])}
    diff = lambda key: (high[key] - low[key]) / steps
    return {"aten_ops": sum(ops.values()), "launches": diff("launches"), "top_ms": diff("top_ms"),
            "gpu_ms": diff("gpu_ms"), "sync_ms": diff("sync_ms"), "blocking": diff("blocking"),
            "by_name": ops, "runtime_ms": runtime, "kernel_ms": kernels}


def set_profiling(url: str, on: bool, filename: str, cuda: bool) -> None:
    _http(f"{url}/sdapi/v1/options", {
        "profiling_enable": on, "profiling_activities": ["CPU", "CUDA"] if cuda else ["CPU"],
        "profiling_record_shapes": False, "profiling_profile_memory": False, "profiling_with_stack": False,
        "profiling_filename": filename})


def measure(url: str, case, variant: str, steps: tuple, sampler: str, trace: str) -> dict:
    """Per-step counts of one variant. Each step count is generated twice and the second call is
    counted: the first does the one-time work (model load, LoRA merge, and the text encoding, which
    the WebUI caches per prompt *and* step count)."""
    counts = []
    for n in steps:
        for counted in (False, True):
            if os.path.exists(trace):
                os.remove(trace)
            _http(f"{url}/sdapi/v1/txt2img", dict(request_for(case, variant, n, 1234, sampler), send_images=False))
            if not os.path.exists(trace):
                raise RuntimeError(f"the WebUI wrote no profile to {trace}: is it running on this machine?")
            if counted:
                counts.append(trace_counts(trace))
    return per_step(counts[0], counts[1], steps[1] - steps[0])


def _most_changed(these: dict, plain: dict, top: int) -> list:
    diff = {n: these.get(n, 0) - plain.get(n, 0) for n in set(these) | set(plain)}
    return sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:top]


def format_rows(results: dict, top: int) -> str:
    plain = results.get("plain")
    lines = ["| variant | aten ops / step | launches / step | op ms / step (profiled) | GPU ms / step "
             "| blocking calls / step (ms) | most changed ops vs plain (calls / step) | runtime calls by time (ms / step) "
             "| most changed kernels vs plain (GPU ms / step) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for variant, r in results.items():
        changed = kernels = ""
        if plain is not None and variant != "plain":
            changed = ", ".join(f"{n[6:]} {d:+.0f}" for n, d in _most_changed(r["by_name"], plain["by_name"], top)
                                if abs(d) >= 0.5)
            kernels = ", ".join(f"{n} {d:+.2f}" for n, d in _most_changed(r["kernel_ms"], plain["kernel_ms"], 3)
                                if abs(d) >= 0.05)
        runtime = ", ".join(f"{n} {ms:.1f}" for n, ms in sorted(r["runtime_ms"].items(), key=lambda kv: -kv[1])[:4]
                            if ms >= 0.05)
        lines.append(f"| {variant} | {r['aten_ops']:.0f} | {r['launches']:.0f} | {r['top_ms']:.1f} | {r['gpu_ms']:.1f} "
                     f"| {r['blocking']:.0f} ({r['sync_ms']:.1f}) | {changed} | {runtime} | {kernels} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:7861")
    ap.add_argument("--case", type=parse_case, required=True, help="name:checkpoint:lora:size:batch")
    ap.add_argument("--variants", default="plain,floor,batched,dual")
    ap.add_argument("--steps", default="2,4", help="the two step counts whose difference is counted")
    ap.add_argument("--sampler", default="Euler")
    ap.add_argument("--cuda", action="store_true", help="also record CUDA activity (kernel launches)")
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--json", help="also write the per-step counts here")
    args = ap.parse_args(argv)
    steps = tuple(int(s) for s in args.steps.split(","))
    if len(steps) != 2 or steps[1] <= steps[0]:
        ap.error("--steps takes two increasing step counts, e.g. 2,4")
    trace = os.path.join(tempfile.mkdtemp(prefix="step-ops-"), "trace.json")
    results = {}
    variants = [v for v in args.variants.split(",") if v]
    # One generation before anything is counted: the first ones after the WebUI starts carry
    # one-time work (kernel selection, lazy loading) that the per-count warm-ups did not absorb.
    _http(f"{args.url}/sdapi/v1/txt2img", dict(request_for(args.case, variants[0], steps[1], 1234, args.sampler),
                                                send_images=False))
    set_profiling(args.url, True, trace, args.cuda)
    try:
        for variant in variants:
            results[variant] = measure(args.url, args.case, variant, steps, args.sampler, trace)
            print(f"{args.case.name} {variant}: {results[variant]['aten_ops']:.0f} aten ops, "
                  f"{results[variant]['launches']:.0f} launches per step", flush=True)
    finally:
        set_profiling(args.url, False, "trace.json", False)
    print(format_rows(results, args.top))
    if args.json:
        Path(args.json).write_text(json.dumps({"case": args.case.name, "steps": steps, "per_step": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
