"""LoRA files of the other network types (LoCon with 3x3 convs, LoHa, LoKr, DoRA, OFT) on every WebUI,
once per LoRA mode of the host, SD1.5, 64x64, 4 steps.

The files are random-weight SD1.5 networks in the layouts the hosts' LoRA loaders read
(makers/network_types.py), made into models/Lora/autolora-e2e/ when missing. A host takes part with the
types its loader reads (HostSpec.network_types: Forge main and the October-2025 Neo tree have no OFT);
other hosts and types are skipped with the reason, and so is a type the WebUI itself fails at in one of
its modes (HostSpec.network_type_failures, each seen in a run: A1111's lora_functional with float16 LoHa
and LoKr files in full precision).

For each type, in this order (a fixture runs it once and the tests below judge it):
  1. the plain image without and with `<lora:name:1>`, with the WebUI's defaults (empty negative prompt,
     the UI's default sampler, schedule type and CFG), both drawn and visibly different; the loader took
     every module of the file: the Forge family's log says so ("[LORA] Loaded <file> for ...-UNet with N
     keys ... (skipped 0 keys)", the same for CLIP); A1111 logs nothing on success and keeps only the
     modules it matched to a layer, which AutoLoRA's stats count (`modules`, from the γ 1 run of `auto`);
     and the log shows nothing unmatched or failed to merge;
  2. AutoLoRA at γ 1 and γ 0 for every base-branch strategy: HTTP 200; γ 1 = the plain LoRA image,
     γ 0 = the image without the LoRA (identities within the suite's tolerance), with the base branch run;
  3. the plain images again, byte-identical to the first ones: the weights were not changed.
Each request's peak resident memory of the WebUI is recorded (printed per type); past
AUTOLORA_E2E_RSS_LIMIT_GB (default 75 % of the machine's memory) the suite kills the WebUI, records the
call as "died" and starts the WebUI again for the next call, as it does when the kernel kills it.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import struct
import threading
import time
import urllib.error
from dataclasses import dataclass, field
from typing import Optional

import pytest

from hosts import ensure_models, ensure_network_type_lora
from webui import Result, assert_close, assert_differs, assert_drawn, with_autolora

ARCH = "sd15"
STEPS = 4
TYPES = ("locon", "loha", "lokr", "dora", "oft")
STRATEGIES = ("auto", "batched", "sequential", "swap", "dual")
GAMMAS = (1.0, 0.0)


def base_req(webui, **kw) -> dict:
    req = {"prompt": "a photo of a cat", "steps": STEPS, "width": 64, "height": 64, "cfg_scale": 7, "seed": 12345}
    req.update(webui.host.spec.archs[ARCH].ui_defaults)  # empty negative prompt, the UI's sampler/schedule/CFG
    req.update(kw)
    return req


def lora_req(webui, name: str) -> dict:
    req = base_req(webui)
    req["prompt"] = f"{req['prompt']} <lora:{name}:1>"
    return req


def safetensors_metadata(path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)).get("__metadata__", {})


@dataclass
class TypeRun:
    """What one network type gave on one host and LoRA mode."""

    kind: str
    file: str
    meta: dict
    mode: str = ""
    plain: Result = None
    lora: Result = None
    log: str = ""  # the server log written while the plain LoRA image was made
    # {"UNet"/"CLIP": (keys loaded, keys skipped, on the fly or None)}: the loader's report, or None
    report: Optional[dict] = None
    autolora: dict = field(default_factory=dict)  # (strategy, γ) -> Call
    plain_after: Result = None
    lora_after: Result = None


def rss_limit() -> int:
    """Bytes of resident memory the WebUI may use before the suite kills it (so that a runaway
    generation does not make the kernel kill other work on the machine): AUTOLORA_E2E_RSS_LIMIT_GB,
    default 75 % of the machine's memory."""
    if os.environ.get("AUTOLORA_E2E_RSS_LIMIT_GB"):
        return int(float(os.environ["AUTOLORA_E2E_RSS_LIMIT_GB"]) * 2**30)
    with open("/proc/meminfo") as f:
        total_kb = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    return int(total_kb * 1024 * 0.75)


class PeakRSS:
    """The peak resident memory of one process while the block runs (polled), killing it past `limit`."""

    def __init__(self, pid: int, limit: int):
        self.pid, self.limit, self.peak, self.killed = pid, limit, 0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _rss(self) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) * 1024
        except (OSError, StopIteration):
            return 0

    def _poll(self):
        while not self._stop.is_set():
            rss = self._rss()
            self.peak = max(self.peak, rss)
            if rss > self.limit and not self.killed:
                self.killed = True
                try:
                    os.kill(self.pid, signal.SIGKILL)  # the WebUI this suite started, by its id
                except OSError:
                    pass
            self._stop.wait(0.25)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@dataclass
class Call:
    """One txt2img request: HTTP status ("died" when the WebUI's process ended during it), the result
    when 200, the error text otherwise, and the WebUI's peak resident memory meanwhile (GiB)."""

    status: object
    result: Result = None
    error: str = ""
    peak_gib: float = 0.0


def generate(webui, req) -> Call:
    """The request without asserting (every case is judged afterwards). When the WebUI's process ends
    during it (killed for memory, crashed), the call says so and the WebUI is started again for the next."""
    server = webui.server
    with PeakRSS(server.proc.pid, rss_limit()) as mem:
        try:
            status, body = webui.post("/sdapi/v1/txt2img", req)
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError) as exc:
            status, body = None, repr(exc)
    peak = mem.peak / 2**30
    if status is None:
        try:
            server.proc.wait(15)
        except Exception:
            pass
    if server.proc.poll() is not None:
        rc = server.proc.returncode
        why = (f"killed by the suite above {rss_limit() / 2**30:.1f} GiB" if mem.killed else
               "killed (SIGKILL: out of memory?)" if rc == -signal.SIGKILL else "crashed")
        tail = "\n".join(line.rstrip() for line in server.log_tail(6).splitlines())
        error = f"the WebUI exited with {rc}, {why}, peak RSS {peak:.1f} GiB; log tail:\n{tail}"
        server.restart()
        webui._cache.clear()
        return Call("died", None, error, peak)
    if status != 200:
        return Call(status, None, str(body)[:400], peak)
    result = Result([base64.b64decode(i) for i in body["images"]], json.loads(body["info"]), webui.stats())
    return Call(status, result, "", peak)


def plain(webui, req) -> Result:
    call = generate(webui, req)
    assert call.status == 200, f"a request without AutoLoRA: HTTP {call.status} {call.error}"
    return call.result


def one_line_per_record(text: str) -> str:
    """The log with Forge Neo 2.x's rich layout undone: a record's message wrapped over several lines,
    with "networks.py :: INFO" in a right-hand column, becomes one line (a new record starts with "[")."""
    text = re.sub(r"[ \t]+\S+\.py :: (?:DEBUG|INFO|WARNING|ERROR|CRITICAL)[ \t]*", " ", text)
    return re.sub(r"[ \t]*\n[ \t]*(?![\[A-Z*])", " ", text)


def read_log_since(webui, offset: int, wait_for: str, timeout: float = 10) -> str:
    """The server log written since `offset`, once a line matches the regex `wait_for` (or after `timeout`)."""
    deadline = time.time() + timeout
    while True:
        with open(webui.server.log_path, "rb") as f:
            f.seek(offset)
            text = one_line_per_record(f.read().decode(errors="replace"))
        if re.search(wait_for, text) or time.time() > deadline:
            return text
        time.sleep(0.5)


# The LoRA loader's report: a line per part on Forge and its forks (ldm_patched/modules/sd.py,
# backend/patcher/lora.py), with the keys it skipped and, on Forge, whether it patches on the fly ...
LOADED_PER_PART = (r"\[LORA\] Loaded \S*{file} for \S+-{part} with (\d+) keys.*?\(skipped (\d+) keys\)"
                   r"(?: with on_the_fly = (\w+))?")
# ... or one line for both on reForge, whose skipped keys are each a warning of their own.
LOADED_BOTH = r"\[LORA\] Loaded \S*{file} for \S+ with \d+ keys \(UNet: (\d+), CLIP: (\d+)\)"
REFORGE_SKIPPED = r"lora key not loaded|NOT LOADED"
LOADED_ANY = r"-CLIP with \d+ keys|\(UNet: \d+, CLIP: \d+\)"


def loader_report_of_a1111(run) -> Optional[dict]:
    """A1111's Lora extension logs the keys it could not match only at debug level and keeps the
    others as the network's modules: those AutoLoRA read from it (stats `modules`, the text encoder's
    and the UNet's; the layers it could not read are counted in its notices, "N layer(s) ... kept in
    both branches")."""
    call = run.autolora.get(("auto", 1.0))
    if call is None or call.result is None:
        return None
    stats = call.result.stats
    skipped = sum(int(n) for notice in stats["notices"] if "kept in both branches" in notice
                  for n in re.findall(r"(\d+) layer\(s\)", notice))
    return {"UNet": (stats["modules"]["unet"], skipped, None), "CLIP": (stats["modules"]["text_encoder"], 0, None)}


def loader_report(log: str, file: str) -> Optional[dict]:
    """{"UNet"/"CLIP": (keys loaded, keys skipped, on the fly: "True"/"False"/None)}, or None without a report."""
    name = re.escape(file)
    parts = {part: re.search(LOADED_PER_PART.format(file=name, part=part), log) for part in ("UNet", "CLIP")}
    if all(parts.values()):
        return {part: (int(m.group(1)), int(m.group(2)), m.group(3)) for part, m in parts.items()}
    both = re.search(LOADED_BOTH.format(file=name), log)
    if both is None:
        return None
    skipped = len(re.findall(REFORGE_SKIPPED, log))  # not per part: counted once, on the UNet
    return {"UNet": (int(both.group(1)), skipped, None), "CLIP": (int(both.group(2)), 0, None)}


_RUNS = {}


@pytest.fixture
def type_lora(host, kind):
    """The LoRA file of this type for this host (made when missing), or a skip with the reason."""
    if host is None:
        pytest.skip("no host")
    if kind not in host.spec.network_types:
        pytest.skip(f"{host.spec.label or host.name}: its LoRA loader reads no {kind} files "
                    f"(reads: {', '.join(host.spec.network_types) or 'none'})")
    models = ensure_models(host, ARCH)
    return ensure_network_type_lora(host, kind, models["source"])


@pytest.fixture
def run(type_lora, kind, host, mode, request) -> TypeRun:
    if (mode, kind) in host.spec.network_type_failures:  # the WebUI fails at the plain LoRA image itself
        pytest.skip(f"{host.spec.label or host.name}, {mode}: {host.spec.network_type_failures[(mode, kind)]}")
    # The WebUI only now, after the skips: as an argument, the module-scoped fixture would start
    # a server before any function-scoped fixture could skip.
    webui = request.getfixturevalue("webui")
    key = (webui.url, webui.mode, kind)
    if isinstance(_RUNS.get(key), BaseException):
        pytest.fail(f"{kind}: the run failed in an earlier test: {_RUNS[key]!r}")
    if key not in _RUNS:
        try:
            _RUNS[key] = _run(webui, kind, type_lora)
        except Exception as exc:  # judged once, not re-run by every test of the type
            _RUNS[key] = exc
            raise
    return _RUNS[key]


def _run(webui, kind, type_lora) -> TypeRun:
    name = type_lora.stem
    out = TypeRun(kind, type_lora.name, safetensors_metadata(type_lora), webui.mode)
    forge = webui.host.spec.family == "forge"  # A1111 prints no loader report: nothing to wait for
    if webui.server.proc.poll() is not None:  # ended during another type's run and was not restarted
        webui.server.restart()
    out.plain = plain(webui, base_req(webui))
    offset = webui.server.log_path.stat().st_size
    out.lora = plain(webui, lora_req(webui, name))
    out.log = read_log_since(webui, offset, LOADED_ANY if forge else "")
    for strategy in STRATEGIES:
        for gamma in GAMMAS:
            args = {"enabled": True, "gamma": gamma, "strategy": strategy}
            out.autolora[(strategy, gamma)] = generate(webui, with_autolora(lora_req(webui, name), args))
    out.report = loader_report(out.log, out.file) if forge else loader_report_of_a1111(out)
    out.plain_after = plain(webui, base_req(webui))
    out.lora_after = plain(webui, lora_req(webui, name))
    print(f"{kind} on {webui.host.spec.label or webui.host.name}, {webui.mode}: "
          + "; ".join(f"{s} γ{g:g}: {c.status}, {c.peak_gib:.1f} GiB" for (s, g), c in out.autolora.items()))
    return out


parametrize_types = pytest.mark.parametrize("kind", TYPES)


@parametrize_types
def test_the_loader_takes_every_module_and_the_lora_changes_the_image(run):
    n_unet, n_te = int(run.meta["autolora_e2e_unet_modules"]), int(run.meta["autolora_e2e_te_modules"])
    report = run.report
    assert report, (f"{run.kind}: no loader report ('[LORA] Loaded' for UNet and CLIP on the Forge family, "
                    f"AutoLoRA's stats of the γ 1 `auto` run on A1111):\n{run.log[-3000:]}")
    assert report["UNet"][:2] == (n_unet, 0) and report["CLIP"][:2] == (n_te, 0), (run.kind, report)
    if report["UNet"][2]:  # Forge says whether it patches on the fly: the LoRA mode took
        assert report["UNet"][2] == str(run.mode == "online"), (run.mode, report)
    bad = [line for line in run.log.splitlines()
           if (run.file in line and re.search(r"unmatched|[Mm]ismatch", line))
           or re.search(r"\bERROR (lora|loha|lokr|oft|boft|glora|diff|set) ", line)
           or re.search(r"^\*\*\* .*network|loading network \S+: \w+", line)]  # A1111's errors.report, .display
    assert not bad, f"{run.kind}: the loader did not take the file cleanly: {bad[:5]}"
    assert_drawn(run.plain.image, f"{run.kind}: no-LoRA image")
    assert_drawn(run.lora.image, f"{run.kind}: LoRA image")
    assert_differs(run.plain.image, run.lora.image, f"{run.kind}: the LoRA must change the image")


@parametrize_types
def test_autolora_answers_200_for_every_strategy(run):
    failed = [f"{s} γ{g:g}: HTTP {c.status} (peak RSS {c.peak_gib:.1f} GiB) {c.error}"
              for (s, g), c in run.autolora.items() if c.status != 200]
    assert not failed, f"{run.kind}: " + "; ".join(failed)


@parametrize_types
def test_gamma1_is_the_lora_image_and_gamma0_the_image_without_it(run):
    failures = []
    for (strategy, gamma), call in run.autolora.items():
        result = call.result
        if result is None:
            failures.append(f"{strategy} γ{gamma:g}: HTTP {call.status}")
            continue
        want = run.lora if gamma == 1.0 else run.plain
        what = f"{run.kind} {strategy} γ={gamma:g} vs {'plain LoRA' if gamma == 1.0 else 'no LoRA'}"
        try:
            assert_drawn(result.image, what)
            assert_close(result.image, want.image, what)
            st = result.stats
            assert st["active"] and st["guided_steps"] >= STEPS and st["base_calls"] >= STEPS, (what, st)
            assert st["modules"]["unet"] > 0, (what, st["modules"])
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, failures


@parametrize_types
def test_plain_images_are_byte_identical_afterwards(run):
    """After all of the type's AutoLoRA calls (and any that failed): the weights were not changed.
    (Where the WebUI had to be started again, it proves less: the weights were read from disk again.)"""
    assert run.plain_after.pngs[0] == run.plain.pngs[0], f"{run.kind}: the no-LoRA image changed"
    assert run.lora_after.pngs[0] == run.lora.pngs[0], f"{run.kind}: the plain LoRA image changed"
