"""The lifecycle of an AutoLoRA generation inside a WebUI: one for every host.

The AlwaysOn script calls, for each generation `p`:

    start_batch(p, settings)        each batch, after the host activated its LoRAs
    before_sampling(p, c=.., uc=..) before each sampling pass (the first, the hires one)
    generation(p)                   the Generation running for `p` (infotext, stats)
    suspend()                       a job nested in the running one starts (a detailer pass)
    finish(p)                       at postprocess; finish(None): every generation whose postprocess
                                    never ran (it raised)

and the host's sampler calls the step hook a host adapter installs, which runs `step.py`. WebUIs
generate one image job at a time, so one generation holds the host (`gen`, `p`); a job may run
another inside its own (ADetailer's inpainting pass, from an image's postprocessing): its
generation lets go of the host and waits (`waiting`) until its next batch binds again.

A host adapter fills in only what differs between WebUIs:

    loaded_loras()                  the batch's LoRAs: (key, name, other names...) each
    refusal(p)                      why the loaded model cannot be guided, or None
    open_batch(p, gen)              read the guided LoRAs, prepare the base text encoding
    bind_pass(p, gen, c, uc)        read what the pass needs, install the step hook
    close(gen, p)                   undo everything bound for the generation
"""
from __future__ import annotations

import inspect
from typing import Optional

from ..generation import Generation
from .. import memory
from ..prompts import select_guided

NO_LORA_EXTENSION = "AutoLoRA: the built-in LoRA extension is not loaded; AutoLoRA is off"
NO_LORA = "AutoLoRA: no LoRA in the prompt, nothing to guide; generated without AutoLoRA"
MODEL_CHANGED = "AutoLoRA: the model changed during sampling (refiner); the rest runs without AutoLoRA"
CFG_1 = "AutoLoRA: at CFG 1 the WebUI evaluates no negative prompt, so w1 and w2 do not apply"


class Adapter:
    name = "host"
    available = True
    reason: Optional[str] = None

    def __init__(self):
        self.gen: Optional[Generation] = None  # the generation bound to the host, for job `p`
        self.p = None
        self.waiting: list = []  # (p, Generation) of the jobs a nested job interrupted, outermost first

    # -- what the script calls ---------------------------------------------------------------------
    def generation(self, p) -> Optional[Generation]:
        return next((gen for its_p, gen in [(self.p, self.gen), *self.waiting] if gen is not None and its_p is p),
                    None)

    def start_batch(self, p, settings) -> Optional[str]:
        """Returns a notice when AutoLoRA cannot run (the generation goes on without it)."""
        gen = self.generation(p)
        if gen is None or gen is not self.gen:
            if self.gen is not None:
                self.finish(self.p)  # one whose postprocess never ran (it raised)
            if gen is None:
                gen = Generation(settings, self.name)
                refusal = self.refusal(p)
                if refusal:
                    return self._refuse(gen, refusal)
            else:  # the next batch of a job a nested one interrupted: it binds again
                self.waiting = [entry for entry in self.waiting if entry[1] is not gen]
            self.gen, self.p = gen, p
        loaded = self.loaded_loras()
        if not loaded:
            return self._refuse(gen, NO_LORA_EXTENSION if loaded is None else NO_LORA)
        gen.loaded = tuple(entry[0] for entry in loaded)
        gen.guided = frozenset(select_guided(loaded, gen.settings.guided_loras))  # raises for unknown names
        gen.stats.guided_loras = [entry[1] for entry in loaded if entry[0] in gen.guided]
        self.open_batch(p, gen)
        if self.gen is gen:
            gen.stats.active = True
            gen.begin_batch()
        return None

    def before_sampling(self, p, c=None, uc=None, **_) -> None:
        gen = self.gen if self.p is p else None
        if gen is None or gen.stopped or c is None:
            return
        gen.hires = bool(getattr(p, "is_hr_pass", False))
        if gen.hires and not self._select_for_hires(p, gen):
            return
        if gen.explicit_cfg_ignored(getattr(p, "cfg_scale", 0)):
            gen.note(CFG_1, p.comment)
        self.bind_pass(p, gen, c, uc)

    def suspend(self) -> None:
        """A job nested in the running one starts: the running generation lets go of the host (its
        pass closed, its strategy and host state released) and waits for its job's next batch."""
        if self.gen is not None:
            gen, p = self.gen, self.p
            self.gen = self.p = None
            self.waiting.append((p, gen))
            self._release(gen, p)

    def finish(self, p) -> None:
        """Finishes `p`'s generation (None: every one). Idempotent; also after an exception or an
        interrupt."""
        running = [(its_p, gen) for its_p, gen in [*self.waiting, (self.p, self.gen)]
                   if gen is not None and (p is None or its_p is p)]
        for its_p, gen in running:
            if gen is self.gen:
                self.gen = self.p = None
            else:
                self.waiting = [entry for entry in self.waiting if entry[1] is not gen]
            try:
                self._release(gen, its_p)
            finally:
                gen.finish(memory.peak_bytes())

    def _release(self, gen: Generation, p) -> None:
        try:
            self.close(gen, p)
        finally:
            try:
                gen.close_strategy()  # it holds the factors' prepared (dense) deltas
            finally:
                gen.host_state = None  # the factors go now, before the trim (the caller may keep `gen`)
                if gen.stats.dense_layers:  # gigabytes freed on the CPU: back to the OS, not kept by glibc
                    memory.return_free_heap()

    # -- what every host shares --------------------------------------------------------------------
    def _refuse(self, gen: Generation, notice: str) -> str:
        gen.stats.notices.append(notice)
        if self.gen is gen:
            self.finish(self.p)
        else:
            gen.finish()
        return notice

    def _select_for_hires(self, p, gen: Generation) -> bool:
        """The hires prompt may name other LoRAs: select the guided ones again (False: it runs plain)."""
        loaded = self.loaded_loras() or []
        try:
            guided = frozenset(select_guided(loaded, gen.settings.guided_loras)) if loaded else frozenset()
        except Exception as exc:  # noqa: BLE001 - a name of the first pass's prompt is missing here
            gen.note(f"{exc}; the hires pass runs without AutoLoRA", p.comment)
            return False
        if not guided:
            gen.note("AutoLoRA: no LoRA in the hires prompt; the hires pass runs without AutoLoRA", p.comment)
            return False
        gen.loaded, gen.guided = tuple(entry[0] for entry in loaded), guided
        return True

    # -- what a host fills in ----------------------------------------------------------------------
    def loaded_loras(self) -> Optional[list]:
        raise NotImplementedError

    def refusal(self, p) -> Optional[str]:
        return None

    def open_batch(self, p, gen: Generation) -> None:
        raise NotImplementedError

    def bind_pass(self, p, gen: Generation, c, uc) -> None:
        raise NotImplementedError

    def close(self, gen: Generation, p) -> None:
        raise NotImplementedError


def register_callback(register, callback) -> None:
    """`register(callback)` through one of the host's script_callbacks.on_* functions, named
    "autolora" where the host names callbacks (A1111 1.8+, Forge, reForge: the name orders and
    replaces them on a reload); Forge Classic's registrars take the callback alone."""
    if "name" in inspect.signature(register).parameters:
        register(callback, name="autolora")
    else:
        register(callback)


def open_strategy(gen: Generation, opts, factors, p, **measured):
    """The pass's base-branch strategy, with the user's settings entries (the strategy `auto`
    stands for, the swap budget) and what the host measured (`Generation.open_strategy`)."""
    budget_mb = getattr(opts, "autolora_swap_budget_mb", 0) or 0
    return gen.open_strategy(factors, default=getattr(opts, "autolora_default_strategy", "auto"),
                             swap_budget_bytes=int(budget_mb * 2 ** 20) if budget_mb > 0 else None,
                             comment=getattr(p, "comment", None), **measured)


def model_changed(gen: Generation, comment) -> None:
    """The host switched models mid-sampling (a refiner): the rest runs without AutoLoRA."""
    gen.stopped = "model changed"
    gen.note(MODEL_CHANGED, comment)


class UnavailableAdapter(Adapter):
    """Used when the WebUI lacks what AutoLoRA binds to: the accordion says so, the API refuses an
    enabled request with the reason, no image claims AutoLoRA, and the WebUI runs as without it."""

    name = "unavailable"
    available = False

    def __init__(self, reason: str):
        super().__init__()
        self.reason = reason

    def start_batch(self, p, settings):
        return f"AutoLoRA is unavailable on this WebUI: {self.reason}"
