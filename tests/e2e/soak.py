"""Soak and fault run against a live WebUI with AutoLoRA installed: bounded, loopback only.

    python tests/e2e/soak.py --url http://127.0.0.1:7860 --webui-dir /path/to/webui \
        --lora random_lora --lora-b autolora_e2e_lora_b [--calls 120] [--max-seconds 3600]

It sends `--calls` mixed API calls (AutoLoRA on with every strategy, off, one and two LoRAs, bad
arguments of every kind, `/sdapi/v1/interrupt` and `/sdapi/v1/skip` mid-run, a LoRA file deleted
while the WebUI still lists it, a checkpoint switch between calls) and checks what a WebUI left
running for days needs:
- the server answers after every call;
- every bad call is rejected (HTTP 422) with a message that names AutoLoRA and the problem;
- memory the server holds stays flat after warm-up (GET /autolora/v1/residue: RSS after a GC and
  malloc_trim, and live tensor bytes; raw RSS is reported with where it rose most);
- no hook or callback is left registered: the host's callback lists, the hooks on the model's
  modules and AutoLoRA's open runs are what they were before the first AutoLoRA call;
- a plain generation at the end, with and without a LoRA, is byte-identical to the same one at
  the start.
It prints a table (calls, errors by kind, memory, residue, identical yes/no) and exits 1 when a
check fails. `tests/e2e/test_soak.py` runs it inside the e2e suite. It stops by itself: after
`--calls` calls or `--max-seconds`, whichever comes first.
"""
from __future__ import annotations

import argparse
import base64
import collections
import ipaddress
import json
import random
import shutil
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hosts import get_json, post_json  # noqa: E402

STEPS = 3
LONG_STEPS = 16  # the runs that get interrupted or skipped
SOAK_LORA = "autolora_soak_deleted"  # a copy of the LoRA that is deleted while listed
SOAK_CKPT_PREFIX = "autolora-soak-"  # a second checkpoint file for the switch
STRATEGIES = ("auto", "batched", "dual", "sequential", "swap")
# The memory readings of GET /autolora/v1/residue (lib_autolora/memory_probe.py). Raw RSS is
# reported but not judged: glibc keeps freed heap for reuse, so re-patching weights can step it by
# a model's size at a random call (measured on Forge: at call 41 in one run, ~100 in the next, flat
# otherwise). Judged: RSS after a GC and malloc_trim (what is held), and live tensor bytes.
MEMORY_SERIES = {"resident": "resident_bytes", "resident after trim": "resident_bytes_trimmed",
                 "live tensors": "tensor_bytes"}
JUDGED = {"resident after trim": "rss_tolerance_mb", "live tensors": "tensor_tolerance_mb"}

# Bad AutoLoRA entries of every kind (the value of alwayson_scripts["AutoLoRA"]), each with a piece
# of the message it must get.
BAD_ENTRIES = [
    ({"args": {"enabled": True, "gama": 1.5}}, "unknown argument"),
    ({"args": [True, "NaN"]}, "finite"),
    ({"args": [True, "inf"]}, "finite"),
    ({"args": [True, "1.5x"]}, "must be a number"),
    ({"args": {"enabled": True, "w1": -3}}, "'w1' must be between 0 and 30"),
    ({"args": {"enabled": True, "gamma": 1e30}}, "'gamma' must be between -10 and 10"),
    ({"args": {"enabled": True, "start": 0.9, "end": 0.1}}, "must not exceed"),
    ({"args": {"enabled": True, "start": 1.5}}, "'start' must be between 0 and 1"),
    ({"args": {"enabled": True, "strategy": "fastest"}}, "must be one of"),
    ({"args": {"enabled": True, "guided_loras": "no_such_lora"}}, "not in the prompt"),
    ({"args": [True] * 64}, "positional args, expected at most"),  # more than the table and its unset boxes will ever take
    ({"args": {"enabled": True, "lora_scale": [1]}}, "must be a number"),
    ({"args": {"enabled": "maybe"}}, "must be true or false"),
    ({"args": {"enabled": True, "base_text_encoder": "sometimes"}}, "must be true or false"),
    ({"args": "not a list"}, "must be a list"),
    ({"args": [True], "extra": 1}, "takes only"),
    ([True, 1.5], "must be an object"),
    ({"args": [{"enabled": True}, {"gamma": 2}]}, "one object in the first slot"),
]


def check_loopback(url: str) -> None:
    host = urllib.parse.urlparse(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise SystemExit(f"soak: cannot resolve {host}: {exc}")
    if not all(ipaddress.ip_address(a).is_loopback for a in addresses):
        raise SystemExit(f"soak: {url} is not a loopback address; this script only talks to a local WebUI")


@dataclass
class Tally:
    calls: int = 0
    by_kind: dict = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    failures: list = field(default_factory=list)
    since_last_sample: list = field(default_factory=list)  # call kinds since memory was last read

    def add(self, kind: str, outcome: str):
        self.calls += 1
        self.by_kind[kind][outcome] += 1
        self.since_last_sample.append(kind)

    def fail(self, text: str):
        self.failures.append(text)


class Soak:
    def __init__(self, args):
        self.url = args.url.rstrip("/")
        self.args = args
        self.tally = Tally()
        self.rng = random.Random(args.seed)
        # (call number, {series: bytes}, the call kinds since the previous reading)
        self.readings = []
        self.webui_dir = Path(args.webui_dir) if args.webui_dir else None

    # -- HTTP ------------------------------------------------------------------------------------
    def post(self, path, payload, timeout=1800):
        return post_json(self.url + path, payload, timeout)

    def get(self, path, timeout=120):
        return get_json(self.url + path, timeout)

    def alive(self) -> bool:
        try:
            self.get("/sdapi/v1/progress?skip_current_image=true", timeout=60)
            return True
        except OSError:
            return False

    def residue(self) -> dict:
        return self.get("/autolora/v1/residue")

    # -- requests --------------------------------------------------------------------------------
    def request(self, loras=(), autolora=None, steps=STEPS, seed=None, **kw) -> dict:
        prompt = "a photo of a cat" + "".join(f" <lora:{name}:{strength}>" for name, strength in loras)
        req = {"prompt": prompt, "negative_prompt": "", "steps": steps, "sampler_name": "Euler a",
               "width": 64, "height": 64, "cfg_scale": 7, "seed": self.rng.randrange(1 << 30) if seed is None else seed}
        req.update(kw)
        if autolora is not None:
            req["alwayson_scripts"] = {"AutoLoRA": {"args": autolora}}
        return req

    def generate(self, kind: str, req: dict, path="/sdapi/v1/txt2img") -> dict | None:
        status, body = self.post(path, req)
        outcome = "ok" if status == 200 else f"HTTP {status}"
        self.tally.add(kind, outcome)
        if status != 200:
            self.tally.fail(f"{kind}: HTTP {status}: {str(body)[:300]}")
            return None
        return body

    def after_call(self):
        if not self.alive():
            raise RuntimeError(f"the server stopped answering after call {self.tally.calls}")
        kinds, self.tally.since_last_sample = self.tally.since_last_sample, []
        residue = self.residue()
        self.readings.append((self.tally.calls, {name: residue.get(key) for name, key in MEMORY_SERIES.items()},
                              ", ".join(dict.fromkeys(kinds))))

    # -- the kinds of calls -----------------------------------------------------------------------
    def autolora_on(self, strategy=None, two=None):
        strategy = strategy or self.rng.choice(STRATEGIES)
        two = self.rng.random() < 0.4 if two is None else two
        loras = [(self.args.lora, 1)] + ([(self.args.lora_b, 0.7)] if two else [])
        settings = {"enabled": True, "gamma": self.rng.choice([0.0, 1.0, 1.5, 2.0]), "strategy": strategy,
                    "lora_scale": self.rng.choice([0.5, 1.0]), "start": self.rng.choice([0.0, 0.25]),
                    "end": self.rng.choice([0.75, 1.0])}
        if two and self.rng.random() < 0.5:
            settings["guided_loras"] = self.args.lora
        self.generate(f"AutoLoRA on ({'2 LoRAs' if two else '1 LoRA'}, {strategy})", self.request(loras, settings))
        stats = self.get("/autolora/v1/stats")
        if not stats.get("active"):
            self.tally.fail(f"AutoLoRA on with {strategy}: not active: {stats.get('notices')}")

    def autolora_off(self):
        args = self.rng.choice([{"enabled": False}, [False], None])
        self.generate("AutoLoRA off", self.request([(self.args.lora, 1)], args))

    def img2img_on(self):
        self.generate("img2img AutoLoRA on", self.request([(self.args.lora, 1)], {"enabled": True},
                                                          init_images=[self.init_image], denoising_strength=0.6),
                      path="/sdapi/v1/img2img")

    def bad_call(self):
        entry, message = self.rng.choice(BAD_ENTRIES)
        req = self.request([(self.args.lora, 1)])
        req["alwayson_scripts"] = {"AutoLoRA": entry}
        path = self.rng.choice(["/sdapi/v1/txt2img", "/sdapi/v1/img2img"])
        if path.endswith("img2img"):
            req["init_images"] = [self.init_image]
        status, body = self.post(path, req)
        text = json.dumps(body)
        ok = status == 422 and "AutoLoRA" in text and message in text
        self.tally.add("bad arguments", "rejected with a message" if ok else f"HTTP {status}")
        if not ok:
            self.tally.fail(f"bad entry {entry!r}: HTTP {status}, {text[:300]}")

    def mid_run(self, action: str):
        """Start a long AutoLoRA run and send /sdapi/v1/<action> once it has made two steps."""
        result = {}
        req = self.request([(self.args.lora, 1)], {"enabled": True}, steps=LONG_STEPS,
                           n_iter=2 if action == "skip" else 1)
        worker = threading.Thread(target=lambda: result.update(r=self.post("/sdapi/v1/txt2img", req)))
        worker.start()
        deadline = time.time() + 600
        while time.time() < deadline and worker.is_alive():
            state = self.get("/sdapi/v1/progress?skip_current_image=true").get("state", {})
            if state.get("sampling_step", 0) >= 2:
                break
            time.sleep(0.3)
        status, _ = self.post(f"/sdapi/v1/{action}", {})
        self.tally.add(action, "ok" if status == 200 else f"HTTP {status}")
        worker.join(1800)
        status = result.get("r", (None,))[0]
        self.tally.add(f"txt2img, {'interrupted' if action == 'interrupt' else 'skipped'} mid-run",
                       "ok" if status == 200 else f"HTTP {status}")
        if status != 200:
            self.tally.fail(f"{action}: the run answered {status}")

    def deleted_lora(self):
        """A LoRA the WebUI lists, used, then its file deleted while still listed, then used again."""
        if self.webui_dir is None:
            return
        lora_dir = self.webui_dir / "models" / "Lora"
        source = next(iter(sorted(lora_dir.rglob(f"{self.args.lora}.safetensors"))), None)
        if source is None:
            self.tally.fail(f"deleted LoRA: {self.args.lora}.safetensors not found under {lora_dir}")
            return
        copy = lora_dir / f"{SOAK_LORA}.safetensors"
        shutil.copyfile(source, copy)
        try:
            self.tally.add("refresh LoRAs", "ok" if self.post("/sdapi/v1/refresh-loras", {})[0] == 200 else "error")
            self.generate("deleted LoRA: before", self.request([(SOAK_LORA, 1)], {"enabled": True}))
        finally:
            copy.unlink(missing_ok=True)
        # Still listed (no refresh): the WebUI reports the missing file; AutoLoRA must not break.
        self.generate("deleted LoRA: after", self.request([(SOAK_LORA, 1)], {"enabled": True}))
        self.tally.add("refresh LoRAs", "ok" if self.post("/sdapi/v1/refresh-loras", {})[0] == 200 else "error")

    def checkpoint_switch(self):
        """Switch to a second checkpoint file (a hard link of the current one under another name,
        which the WebUI loads as a different checkpoint), generate with AutoLoRA, switch back."""
        current = self.get("/sdapi/v1/options").get("sd_model_checkpoint")
        models = self.get("/sdapi/v1/sd-models")
        source = next((Path(m["filename"]) for m in models
                       if m["title"] == current or m["model_name"] in str(current)), None)
        if source is None or not source.exists():
            self.tally.fail(f"checkpoint switch: the current checkpoint {current!r} has no file listed")
            return
        link = source.with_name(SOAK_CKPT_PREFIX + source.name)
        link.unlink(missing_ok=True)
        link.hardlink_to(source)
        try:
            refreshed = self.post("/sdapi/v1/refresh-checkpoints", {})[0] == 200
            self.tally.add("refresh checkpoints", "ok" if refreshed else "error")
            other = next((m["title"] for m in self.get("/sdapi/v1/sd-models") if m["filename"] == str(link)), None)
            for target in (other, current):
                status, body = self.post("/sdapi/v1/options", {"sd_model_checkpoint": target})
                self.tally.add("checkpoint switch", "ok" if status == 200 else f"HTTP {status}")
                if status != 200:
                    self.tally.fail(f"checkpoint switch to {target}: HTTP {status}: {str(body)[:200]}")
                self.generate("AutoLoRA on after a checkpoint switch",
                              self.request([(self.args.lora, 1)], {"enabled": True}))
        finally:
            link.unlink(missing_ok=True)
            self.post("/sdapi/v1/refresh-checkpoints", {})

    # -- the run ---------------------------------------------------------------------------------
    def plain_pair(self) -> dict:
        out = {}
        for key, loras in (("plain", []), ("lora", [(self.args.lora, 1)])):
            body = self.generate(f"plain ({key})", self.request(loras, seed=777))
            out[key] = base64.b64decode(body["images"][0]) if body else b""
        return out

    def run(self) -> int:
        started = time.time()
        self.start_images = self.plain_pair()
        self.init_image = base64.b64encode(self.start_images["plain"]).decode()
        residue_before = self.residue()
        weights = {"on": 6, "off": 2, "bad": 5, "img2img": 1, "interrupt": 1, "skip": 1}
        kinds = list(weights)
        actions = {"on": self.autolora_on, "off": self.autolora_off, "bad": self.bad_call, "img2img": self.img2img_on,
                   "interrupt": lambda: self.mid_run("interrupt"), "skip": lambda: self.mid_run("skip"),
                   "deleted": self.deleted_lora, "switch": self.checkpoint_switch}
        # Warm-up: every kind of call once, and AutoLoRA on with every strategy and one and two
        # LoRAs (a strategy's first run may allocate once, e.g. a host's LoRA-free weight copy),
        # so that memory is judged from a point after every one-time allocation.
        schedule = [lambda s=s, two=two: self.autolora_on(s, two) for s in STRATEGIES for two in (False, True)]
        schedule += [actions[k] for k in ("off", "bad", "img2img", "interrupt", "skip", "deleted", "switch")]
        warmup_calls = None
        while self.tally.calls < self.args.calls - 2 and time.time() - started < self.args.max_seconds:
            if schedule:
                schedule.pop(0)()
            else:
                actions[self.rng.choices(kinds, [weights[k] for k in kinds])[0]]()
            self.after_call()
            if warmup_calls is None and not schedule:
                warmup_calls = self.tally.calls  # every kind of call has run once: warm
        end_images = self.plain_pair()
        self.after_call()
        residue_after = self.residue()
        return self.report(started, residue_before, residue_after, end_images, warmup_calls or 0)

    def report(self, started, before, after, end_images, warmup_calls) -> int:
        identical = {k: end_images[k] == self.start_images[k] and bool(end_images[k]) for k in end_images}
        keys = ("callbacks_total", "callbacks_autolora", "module_hooks", "open_runs", "unet_pre_cfg_functions")
        residue_same = all(before.get(k) == after.get(k) for k in keys)
        lines = [f"AutoLoRA soak against {self.url}: {self.tally.calls} calls in {time.time() - started:.0f} s",
                 f"{'call kind':44s} {'calls':>5s}  outcomes"]
        for kind in sorted(self.tally.by_kind):
            outcomes = self.tally.by_kind[kind]
            counts = ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))
            lines.append(f"{kind:44s} {sum(outcomes.values()):5d}  " + counts)
        mb = lambda b: "n/a" if b is None else f"{b / 2 ** 20:+.0f} MB" if b < 0 else f"{b / 2 ** 20:.0f} MB"  # noqa: E731
        memory_lines, memory_ok = self.memory_report(warmup_calls, mb)
        lines += memory_lines
        lines += ["registered before -> after: " + ", ".join(f"{k} {before.get(k)} -> {after.get(k)}" for k in keys
                                                              if k in before or k in after),
                  f"plain image identical: {'yes' if identical.get('plain') else 'NO'}; "
                  f"LoRA image identical: {'yes' if identical.get('lora') else 'NO'}",
                  f"server alive at the end: {'yes' if self.alive() else 'NO'}",
                  f"failed checks: {len(self.tally.failures)}"]
        lines += [f"  - {f}" for f in self.tally.failures[:20]]
        print("\n".join(lines), flush=True)
        self.summary = {"calls": self.tally.calls, "failures": list(self.tally.failures), "memory_ok": memory_ok,
                        "residue_same": residue_same, "identical": identical, "table": "\n".join(lines)}
        ok = not self.tally.failures and memory_ok and residue_same and all(identical.values())
        return 0 if ok else 1

    def memory_report(self, warmup_calls, mb) -> tuple[list, bool]:
        """One line per memory series (after warm-up, end, max, growth; judged ones against their
        limit), readings every 10 calls, and where raw RSS rose most and after which calls."""
        lines, ok = [], True
        for name in MEMORY_SERIES:
            series = [(n, r[name]) for n, r, _ in self.readings if r.get(name) is not None]
            warm = next((b for n, b in series if n >= warmup_calls), None)
            end = series[-1][1] if series else None
            growth = end - warm if warm is not None and end is not None else None
            line = (f"{name}: after warm-up (call {warmup_calls}) {mb(warm)}, end {mb(end)}, "
                    f"max {mb(max((b for _, b in series), default=None))}; growth {mb(growth)}")
            if name in JUDGED:
                limit = getattr(self.args, JUDGED[name])
                flat = growth is not None and growth <= limit * 2 ** 20
                ok = ok and flat
                line += f" (limit {limit:g} MB): {'flat' if flat else 'NOT FLAT'}"
            else:
                line += " (reported, not judged)"
            lines.append(line)
            lines.append(f"  {name} by call: " + ", ".join(f"{n}: {b / 2 ** 20:.0f}" for n, b in series[::10]) + " MB")
        raw = [(n, r["resident"], kinds) for n, r, kinds in self.readings if r.get("resident")]
        rises = sorted(((b - a[1], n, kinds) for a, (n, b, kinds) in zip(raw, raw[1:])), reverse=True)[:3]
        lines.append("  largest rises of resident memory: " +
                     "; ".join(f"{mb(d)} at call {n} ({kinds})" for d, n, kinds in rises))
        return lines, ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="a local WebUI started with --api")
    ap.add_argument("--webui-dir", help="the WebUI folder (for the deleted-LoRA case)")
    ap.add_argument("--lora", required=True, help="a LoRA name the WebUI lists")
    ap.add_argument("--lora-b", required=True, help="a second LoRA name")
    ap.add_argument("--calls", type=int, default=120)
    ap.add_argument("--max-seconds", type=float, default=3600)
    ap.add_argument("--rss-tolerance-mb", type=float, default=256,
                    help="allowed growth of resident memory after trim between warm-up and the end")
    ap.add_argument("--tensor-tolerance-mb", type=float, default=32,
                    help="allowed growth of live tensor bytes between warm-up and the end")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    check_loopback(args.url)
    return Soak(args).run()


if __name__ == "__main__":
    sys.exit(main())
