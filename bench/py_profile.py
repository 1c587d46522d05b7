"""Where a step's wall-clock time goes in a running WebUI, by Python function (py-spy).

`step_ops.py` counts what a step asks of torch; this says which Python code the sampling thread
was in while the step ran, waiting included: py-spy samples the WebUI's process (`--idle`, so a
thread blocked in a CUDA call is counted where it blocks) during one generation of one variant,
after an unprofiled warm-up generation of the same request. Only the samples whose stack is inside
the sampler (a frame matching `--within`, by default k-diffusion's `sample_*`) count, so text
encoding, VAE and the HTTP server drop out. Printed per variant:

    self    the innermost Python frame with its line: time spent in that line's call into native
            code (an operator call, a CUDA launch, a synchronisation) or in the line itself
    total   each function counted once per sample: time spent in it and below

both as a share of the sampling thread's samples and as milliseconds per step (samples / rate /
steps, so an approximation). py-spy is not part of any WebUI: pass its binary (a wheel from PyPI,
`py-spy`, carried to the GPU machine). Standard library only.

    python bench/py_profile.py --url http://127.0.0.1:7861 --pid 1234 --py-spy /path/bin/py-spy \
        --case sdxl-1024-1:rand_sdxl.safetensors:rank32_sdxl:1024:1 --variant dual
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from webui_bench import _http, parse_case, request_for  # noqa: E402

DEFAULT_WITHIN = r"^sample_\w+ \("
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def parse_raw(text: str) -> list:
    """py-spy's raw (collapsed) output -> [(thread, [frame, ...] outermost first, samples)]."""
    stacks = []
    for line in text.splitlines():
        line = line.rstrip()
        if not line:
            continue
        body, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        thread, *frames = body.split(";")
        stacks.append((thread, frames, int(count)))
    return stacks


def short(frame: str, with_line: bool) -> str:
    """'forward (/x/y/dual.py:160)' -> 'forward (dual.py:160)' or 'forward (dual.py)'."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    name = f"{m['func']} ({os.path.basename(m['file'])}"
    return name + (f":{m['line']})" if with_line and m["line"] else ")")


def summarize(stacks: list, within: str = DEFAULT_WITHIN) -> dict:
    """Self and total samples per frame, over the stacks that pass through a `within` frame,
    counted from that frame down (the sampler's callers are the same in every sample)."""
    pattern = re.compile(within)
    selected, total = collections.Counter(), collections.Counter()
    self_ = collections.Counter()
    n = 0
    for _thread, frames, count in stacks:
        start = next((i for i, f in enumerate(frames) if pattern.search(f)), None)
        if start is None:
            continue
        inner = frames[start:]
        n += count
        self_[short(inner[-1], with_line=True)] += count
        for name in {short(f, with_line=False) for f in inner}:
            total[name] += count
        selected[";".join(short(f, with_line=False) for f in inner)] += count
    return {"samples": n, "self": self_, "total": total, "stacks": selected}


def format_summary(summary: dict, rate: float, steps: int, top: int = 25) -> str:
    n = summary["samples"]
    if not n:
        return "no samples inside the sampler (was the generation shorter than py-spy's start-up?)"
    per_step_ms = 1000.0 / rate / max(steps, 1)
    lines = [f"{n} samples in the sampler at {rate:g} Hz, {steps} steps: "
             f"~{n * per_step_ms:.1f} ms per step"]
    for title, counter in (("self (innermost Python line)", summary["self"]),
                           ("total (function and below)", summary["total"])):
        lines.append(f"  {title}:")
        for name, count in counter.most_common(top):
            lines.append(f"    {100.0 * count / n:5.1f} %  {count * per_step_ms:7.2f} ms/step  {name}")
    return "\n".join(lines)


def profile(url: str, case, variant: str, steps: int, sampler: str, pid: int, py_spy: str,
            rate: int, raw_out: str) -> None:
    """One warm-up generation, then one generation with py-spy attached; writes py-spy's raw output."""
    req = dict(request_for(case, variant, steps, 4321, sampler), send_images=False)
    _http(f"{url}/sdapi/v1/txt2img", req)
    spy = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                            "--idle", "--threads", "--nonblocking", "--duration", "600", "--output", raw_out],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.0)  # py-spy attaches and starts sampling
        if spy.poll() is not None:
            raise RuntimeError(f"py-spy exited at once: {spy.stdout.read().strip()}")
        _http(f"{url}/sdapi/v1/txt2img", req)
    finally:
        if spy.poll() is None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        out, _ = spy.communicate(timeout=60)
    if not os.path.exists(raw_out):
        raise RuntimeError(f"py-spy wrote nothing: {out.strip()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--case", required=True, help="name:checkpoint:lora:size:batch")
    ap.add_argument("--variant", action="append", required=True, help="repeat for several")
    ap.add_argument("--pid", type=int, required=True, help="the WebUI's process id")
    ap.add_argument("--py-spy", required=True, help="path of the py-spy binary")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sampler", default="Euler")
    ap.add_argument("--rate", type=int, default=250)
    ap.add_argument("--within", default=DEFAULT_WITHIN)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--raw-dir", help="keep py-spy's raw output here")
    args = ap.parse_args(argv)
    case = parse_case(args.case)
    rc = 0
    for variant in args.variant:
        raw_dir = args.raw_dir or tempfile.mkdtemp(prefix="py_profile_")
        raw = os.path.join(raw_dir, f"pyspy-{case.name}-{variant}.txt")
        try:
            profile(args.url, case, variant, args.steps, args.sampler, args.pid, args.py_spy, args.rate, raw)
        except Exception as exc:  # one variant's failure must not lose the others
            print(f"== {case.name} {variant}: py-spy failed: {exc}")
            rc = 1
            continue
        with open(raw) as f:
            summary = summarize(parse_raw(f.read()), args.within)
        print(f"== {case.name} {variant}")
        print(format_summary(summary, args.rate, args.steps, args.top))
    return rc


if __name__ == "__main__":
    sys.exit(main())
