"""What one AutoLoRA generation did, for users (GET /autolora/v1/stats), the e2e suite and the
benchmark. Nothing of it goes into images or infotexts. Host-free."""
from __future__ import annotations

import dataclasses
import gc
import threading
import time
from dataclasses import dataclass, field
from typing import Optional


class GcClock:
    """Time the Python garbage collector has run in this process, and its full collections
    (gc.callbacks; installed once, never removed, so nothing is left behind by an interrupted
    generation). A full collection in a WebUI's heap takes a noticeable share of a second; the
    stats say how much of a generation went there, which per-step timings alone cannot."""

    def __init__(self):
        self.seconds = 0.0
        self.full = 0
        self._t0 = None

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None
            if info.get("generation") == 2:
                self.full += 1

    def reading(self) -> tuple:
        return self.seconds, self.full


GC_CLOCK = GcClock()


@dataclass
class Stats:
    """The counters of one generation (every pass and batch of it)."""

    generation: int
    host: str
    settings: dict
    started: float = field(default_factory=time.time)
    active: bool = False  # guidance was set up; `guided_steps` says whether it ran
    strategy: Optional[str] = None
    strategy_reason: Optional[str] = None
    weights_merged: Optional[bool] = None
    guided_loras: list = field(default_factory=list)
    base_calls: int = 0  # base-branch model evaluations
    guided_steps: int = 0  # denoiser calls that returned the AutoLoRA blend
    plain_steps: int = 0  # denoiser calls outside the guidance interval
    te_base_encodes: int = 0  # prompt batches encoded without the guided LoRAs
    te_base_cached: int = 0  # ... reused from an earlier generation (Forge)
    modules: dict = field(default_factory=lambda: {"text_encoder": 0, "unet": 0})  # guided LoRA'd layers
    notices: list = field(default_factory=list)
    failure: Optional[str] = None  # the error that stopped AutoLoRA during sampling, if one did
    peak_vram_bytes: Optional[int] = None
    strategy_setup_ms: Optional[float] = None
    gc_ms: Optional[float] = None
    gc_full_collections: Optional[int] = None
    _gc_at_begin: tuple = field(default=(0.0, 0), repr=False)

    def add_setup_time(self, seconds: float) -> None:
        self.strategy_setup_ms = round(1000.0 * seconds + (self.strategy_setup_ms or 0), 1)

    def end(self, peak_vram_bytes: Optional[int]) -> None:
        """What the garbage collector took since the generation began (the host's work included)."""
        seconds, full = GC_CLOCK.reading()
        seconds0, full0 = self._gc_at_begin
        self.gc_ms = round(1000.0 * (seconds - seconds0), 1)
        self.gc_full_collections = full - full0
        self.peak_vram_bytes = peak_vram_bytes

    def as_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        out["modules"], out["notices"], out["guided_loras"] = dict(self.modules), list(self.notices), list(self.guided_loras)
        out["settings"] = dict(self.settings)
        return out


class StatsBoard:
    """The last generation's Stats, shared by the sampling thread and the HTTP route."""

    def __init__(self):
        self._lock = threading.Lock()
        self.generations = 0
        self.last: Optional[Stats] = None

    def begin(self, host: str, settings: dict) -> Stats:
        GC_CLOCK.install()
        with self._lock:
            self.generations += 1
            stats = Stats(self.generations, host, settings, _gc_at_begin=GC_CLOCK.reading())
            self.last = stats
        return stats

    def snapshot(self) -> dict:
        with self._lock:
            return self.last.as_json() if self.last is not None else {"generation": 0}


BOARD = StatsBoard()
