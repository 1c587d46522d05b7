"""Per-host adapters: the only modules of lib_autolora that import WebUI code.

`select_adapter()` is called once by scripts/autolora.py at import time. It never raises: a host
whose API is missing gets an adapter that explains why AutoLoRA is unavailable.

The interface every adapter implements (calls come from the AlwaysOn script):

    start_batch(p, settings) -> str | None    # after the host activated the LoRAs for this batch:
                                              # read factors, encode base conds, hook the sampler;
                                              # returns a notice for the user, or None
    before_sampling(p, **kwargs) -> None      # Forge: patch the UNet's model_options; A1111: no-op
    finish(p) -> None                         # free per-generation state; idempotent
    register_xyz_axes() -> bool               # add AutoLoRA axes to the X/Y/Z plot script (True: added;
                                              # falsy: the script retries from on_before_ui)

Shared helpers live in hosts/common.py: an adapter whose start_batch set guidance up calls
`common.mark_active(p, settings)` (writes the infotext) and keeps its counters in the record from
`common.DIAGNOSTICS.begin(...)` (served at /autolora/v1/stats: base_calls, guided_steps, strategy, ...).
"""
from __future__ import annotations

import importlib.util
import logging

log = logging.getLogger("autolora")


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

    def finish(self, p):
        return None

    def register_xyz_axes(self):
        return None


def select_adapter():
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
