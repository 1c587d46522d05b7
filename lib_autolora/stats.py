"""What one AutoLoRA generation did, for users (GET /autolora/v1/stats), the e2e suite and the
benchmark. Nothing of it goes into images or infotexts. Host-free."""
from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Optional


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
    dense_layers: int = 0  # of them, those whose LoRA is a dense delta (DoRA, OFT, ...): layer-sized each
    notices: list = field(default_factory=list)
    failure: Optional[str] = None  # the error that stopped AutoLoRA during sampling, if one did
    peak_vram_bytes: Optional[int] = None
    strategy_setup_ms: Optional[float] = None
    gc_ms: Optional[float] = None  # the garbage collector's share, with diagnostics on
    gc_full_collections: Optional[int] = None
    finished: bool = False
    seconds: float = 0.0  # from the first batch to the end
    _clock: object = field(default=None, repr=False)
    _gc_at_begin: tuple = field(default=(0.0, 0), repr=False)

    def add_setup_time(self, seconds: float) -> None:
        self.strategy_setup_ms = round(1000.0 * seconds + (self.strategy_setup_ms or 0), 1)

    def end(self, peak_vram_bytes: Optional[int]) -> None:
        """Closes the record; with diagnostics on, what the garbage collector took since the
        generation began (the host's work included)."""
        self.finished = True
        self.seconds = round(time.time() - self.started, 2)
        self.peak_vram_bytes = peak_vram_bytes
        if self._clock is not None:
            seconds, full = self._clock.reading()
            seconds0, full0 = self._gc_at_begin
            self.gc_ms = round(1000.0 * (seconds - seconds0), 1)
            self.gc_full_collections = full - full0

    def summary(self) -> str:
        """One line for users, under the images: what ran and what it took."""
        steps = self.guided_steps + self.plain_steps
        setup = f", set-up {self.strategy_setup_ms / 1000:.1f} s" if self.strategy_setup_ms else ""
        failed = f"; stopped by an error ({self.failure})" if self.failure else ""
        return (f"AutoLoRA: {self.guided_steps} of {steps} steps guided, base branch '{self.strategy or 'none'}', "
                f"{self.seconds:.1f} s for the whole generation{setup}{failed}")

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
        self.gc_clock = None  # diagnostics.GcClock, set only with diagnostics on

    def begin(self, host: str, settings: dict) -> Stats:
        clock = self.gc_clock
        with self._lock:
            self.generations += 1
            stats = Stats(self.generations, host, settings, _clock=clock,
                          _gc_at_begin=clock.reading() if clock is not None else (0.0, 0))
            self.last = stats
        return stats

    def open_runs(self) -> int:
        """1 while the last generation has begun and not ended (a leak check's reading)."""
        last = self.last
        return int(last is not None and not last.finished)

    def snapshot(self) -> dict:
        with self._lock:
            return self.last.as_json() if self.last is not None else {"generation": 0}


BOARD = StatsBoard()
