"""Per-host adapters: the only modules of lib_autolora that import WebUI code.

`select_adapter()` is called once by scripts/autolora.py at import time. It never raises: a host
whose API is missing gets an adapter that explains why AutoLoRA is unavailable.

Besides the adapters (hosts/a1111/, hosts/forge/), the glue both share lives in modules named for
their job: prompts.py (the LoRAs a prompt names), api_args.py and http.py (the API check and the
routes), xyz.py (X/Y/Z axes), text_encoding.py (finite base conditionings), networks.py (the
built-in LoRA extension), memory.py (device memory readings).
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Optional, Protocol

from ..generation import Generation

log = logging.getLogger("autolora")


class HostAdapter(Protocol):
    """What the AlwaysOn script calls, in this order, for each generation `p`."""

    name: str

    def start_batch(self, p, settings) -> Optional[str]:
        """After the host activated the batch's LoRAs: read factors, prepare the base conditioning,
        hook the sampler. Returns a notice when AutoLoRA cannot run (the generation goes on without)."""

    def before_sampling(self, p, **kwargs) -> None:
        """The host's process_before_every_sampling (first pass and hires pass)."""

    def generation(self, p) -> Optional[Generation]:
        """The Generation running for `p`, if any."""

    def finish(self, p) -> None:
        """Free every per-generation state; idempotent, also after an exception or interrupt."""

    def residue(self) -> dict:
        """What the adapter has registered in the host now (the soak test's leak check)."""


def host_name() -> str:
    if importlib.util.find_spec("modules_forge") is not None and importlib.util.find_spec("backend") is not None:
        return "forge"
    return "a1111"


class UnavailableAdapter:
    """Used when the host's API is missing or changed: AutoLoRA reports itself off, the WebUI runs."""

    name = "unavailable"

    def __init__(self, reason: str):
        self.reason = reason

    def start_batch(self, p, settings):
        return f"AutoLoRA is unavailable on this WebUI: {self.reason}"

    def before_sampling(self, p, **kwargs):
        return None

    def generation(self, p):
        return None

    def finish(self, p):
        return None

    def residue(self) -> dict:
        return {}


def select_adapter() -> HostAdapter:
    name = host_name()
    try:
        if name == "forge":
            from .forge import ForgeAdapter
            return ForgeAdapter()
        from .a1111 import A1111Adapter
        return A1111Adapter()
    except Exception as exc:  # an unknown host version must not break the WebUI
        log.exception("AutoLoRA: could not load the %s adapter", name)
        return UnavailableAdapter(f"{name} adapter failed to load ({type(exc).__name__}: {exc})")
