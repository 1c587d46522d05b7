"""One AutoLoRA generation, as ComfyUI's guiders hold one: what the user asked for, where in the
schedule it guides, the base-branch strategy of the current pass, the notices given and the
counters (`stats.Stats`). Each host adapter keeps one `Generation` per WebUI generation and
nothing else; the host-specific part of its state hangs on `host_state`. Host-free.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

from . import params
from .base_branch import Strategy, StrategyUnavailable, choose_strategy, make_strategy
from .factors import LoraFactors
from .guidance import GuidanceInterval, schedule_weight, scheduled_gamma
from .stats import BOARD, Stats

log = logging.getLogger("autolora")

class Generation:
    def __init__(self, settings, host: str):
        self.settings = settings
        self.interval = GuidanceInterval(settings.start, settings.end)
        self.stats: Stats = BOARD.begin(host, params.as_dict(settings))
        self.strategy: Optional[Strategy] = None
        self.stopped: Optional[str] = None  # why guidance stopped mid-generation (refiner switch, an error)
        self.host_state: Any = None  # the adapter's own per-generation objects
        self.loaded: tuple = ()  # the batch's LoRAs (the host's keys), in the order the host loaded them
        self.guided: frozenset = frozenset()  # ... and the guided ones
        self.hires = False  # the hires-fix pass is sampling (its own γ when hr_gamma is set)
        self._base_calls_closed = 0  # base calls of strategies already closed (earlier passes)
        self._guided_at_batch = 0

    # -- notices ---------------------------------------------------------------------------------
    def note(self, text: str, comment: Optional[Callable] = None) -> None:
        """A notice, given once per generation: in the stats, the log and (with `comment`, the
        host's `p.comment`) the infotext's comments, where users see it under the image."""
        if text in self.stats.notices:
            return
        self.stats.notices.append(text)
        log.warning(text)
        if comment is not None:
            comment(text)

    def fail(self, exc: BaseException, step: int, comment: Optional[Callable] = None) -> None:
        """An error inside sampling: AutoLoRA stops (the host's plain step from here on), the
        strategy is closed (weights and hooks as they were), and the stats and the infotext's
        comments say what happened. Before the first guided step the image is the plain one."""
        log.error("AutoLoRA failed during sampling", exc_info=exc)
        reason = f"{type(exc).__name__}: {exc}"
        self.stopped = f"failed: {reason}"
        self.stats.failure = reason
        self.close_strategy()
        rest = ("the rest of the steps ran without it" if self.stats.guided_steps
                else "generated without AutoLoRA")
        self.note(f"AutoLoRA failed at step {step + 1} ({reason}); {rest}", comment)
        if not self.stats.guided_steps:
            self.stats.active = False

    # -- the base-branch strategy of one pass ------------------------------------------------------
    def open_strategy(self, factors: LoraFactors, *, default: str = "auto", weights_merged: bool = True,
                      lean_memory: bool = False, latent_pixels_per_branch: int = 0,
                      free_bytes: Optional[int] = None, swap_budget_bytes: Optional[int] = None,
                      base_weights: Optional[Callable] = None, comment: Optional[Callable] = None) -> Strategy:
        """Choose (`auto`: by the rule in base_branch/auto.py), build and enter the strategy of
        this pass; a choice the host cannot run falls back to `batched` with a notice."""
        self.close_strategy()
        requested = self.settings.strategy
        if requested == "auto":
            requested = default or "auto"
        swap_bytes = sum(m.weight.numel() * m.weight.element_size() for m in factors.nonzero())
        name, reason = choose_strategy(
            requested, weights_merged=weights_merged, lean_memory=lean_memory,
            latent_pixels_per_branch=latent_pixels_per_branch, swap_bytes=swap_bytes,
            free_bytes=free_bytes, swap_budget_bytes=swap_budget_bytes)
        if requested != "auto" and name != requested:
            self.note(f"AutoLoRA: {reason}", comment)
        kwargs = {"weights_merged": weights_merged}
        if base_weights is not None and name in ("swap", "dual"):
            kwargs["base_weights"] = base_weights
        kwargs["base_strength"] = self.settings.base_strength
        try:
            strategy = make_strategy(name, factors, self.settings.lora_scale, **kwargs)
        except StrategyUnavailable as exc:
            self.note(f"{exc}; using 'batched'", comment)
            name, reason = "batched", str(exc)
            strategy = make_strategy(name, factors, self.settings.lora_scale, weights_merged=weights_merged,
                                     base_strength=self.settings.base_strength)
        started = time.perf_counter()
        try:
            self.strategy = strategy.__enter__()
        except BaseException:
            strategy.__exit__(None, None, None)  # what __enter__ set up before it raised
            raise
        self.stats.add_setup_time(time.perf_counter() - started)
        self.stats.strategy, self.stats.strategy_reason, self.stats.weights_merged = name, reason, weights_merged
        log.info("AutoLoRA: base-branch strategy %s (%s)", name, reason)
        return self.strategy

    def close_strategy(self) -> None:
        if self.strategy is not None:
            strategy, self.strategy = self.strategy, None
            strategy.__exit__(None, None, None)
            self._base_calls_closed += strategy.base_calls
            self.stats.base_calls = self._base_calls_closed

    def count_base_calls(self) -> None:
        self.stats.base_calls = self._base_calls_closed + (self.strategy.base_calls if self.strategy else 0)

    # -- queries of a step (step.py records what ran) ------------------------------------------------
    def cfg_scales(self, cfg_scale: float, *, uncond_evaluated: bool = True) -> tuple:
        """(w1, w2) of a step. Unset ones follow the generation's CFG scale. At CFG 1 there is no
        CFG: Forge evaluates no negative prompt then, and on every host AutoLoRA blends the two
        conditional predictions (w1 and w2 do not apply), as on steps where the host skipped the
        negative prompt (skip-early-CFG, NGMS) and on models without one."""
        scale = float(cfg_scale)
        if not uncond_evaluated or scale == 1.0:
            return scale, scale
        w1 = scale if self.settings.w1 is None else float(self.settings.w1)
        w2 = scale if self.settings.w2 is None else float(self.settings.w2)
        return w1, w2

    def explicit_cfg_ignored(self, cfg_scale: float) -> bool:
        return float(cfg_scale) == 1.0 and (self.settings.w1 is not None or self.settings.w2 is not None)

    def gamma_at(self, step: int = 0, total_steps: int = 0) -> float:
        """γ of a step: the hires pass's own when set, moved by the schedule."""
        s = self.settings
        gamma = s.hr_gamma if self.hires and s.hr_gamma is not None else s.gamma
        if s.schedule == "constant":
            return gamma
        weight = schedule_weight(s.schedule, self.interval.progress(step, total_steps), s.schedule_power,
                                 s.schedule_floor)
        return scheduled_gamma(gamma, weight)

    # -- batches and the infotext -------------------------------------------------------------------
    def begin_batch(self) -> None:
        self._guided_at_batch = self.stats.guided_steps

    def batch_was_guided(self) -> bool:
        """At least one step of the current batch returned the AutoLoRA blend: only then may its
        images' infotext claim AutoLoRA."""
        return self.stats.guided_steps > self._guided_at_batch

    def infotext_fields(self) -> dict:
        """The settings that differ from the defaults, the version, and the strategy that ran
        (params.strategy_that_ran)."""
        from . import VERSION
        fields = params.infotext_fields(self.settings, VERSION)
        if fields and self.stats.strategy:
            fields[params.BY_NAME["strategy"].infotext] = params.strategy_that_ran(self.settings.strategy,
                                                                                   self.stats.strategy)
        return fields

    # -- the end ------------------------------------------------------------------------------------
    def finish(self, peak_vram_bytes: Optional[int] = None) -> None:
        self.close_strategy()
        self.stats.end(peak_vram_bytes)
        s = self.stats
        if s.active:
            log.info("AutoLoRA: %s guided steps, %s plain steps, %s base evaluations (%s); %s base text encodings",
                     s.guided_steps, s.plain_steps, s.base_calls, s.strategy, s.te_base_encodes)
