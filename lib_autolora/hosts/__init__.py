"""Per-host adapters: the only modules of lib_autolora that import WebUI code.

`select_adapter()` is called once by scripts/autolora.py at import time. It never raises: a host
whose API is missing gets an adapter that explains why AutoLoRA is unavailable.

Besides the adapters (hosts/a1111/, hosts/forge/), the glue both share lives in modules named for
their job: adapter.py (the lifecycle), http.py (the routes and the API check), xyz.py (X/Y/Z
axes), networks.py (the built-in LoRA extension).
"""
from __future__ import annotations

import logging

from .adapter import Adapter, UnavailableAdapter

log = logging.getLogger("autolora")


def select_adapter() -> Adapter:
    """The adapter whose capabilities this WebUI has, by what its code does, not by its name: the
    Forge family's binding when its backend has what it needs (api.py describes Forge main's and
    Forge Neo's `backend`, and reForge's and Forge Classic's `ldm_patched`), else A1111's CFG
    denoiser. Anything else gets the UnavailableAdapter with the reason."""
    reasons = []
    try:
        from .forge.api import host_api
        api_cls, reason = host_api()
        if api_cls is not None and reason is None:
            from . import forge
            return forge.ForgeAdapter(api_cls())
        if api_cls is not None:
            reasons.append(reason)
        else:
            from . import a1111
            reason = a1111.missing_capability()
            if reason is None:
                return a1111.A1111Adapter()
            reasons.append(reason)
    except Exception as exc:  # an unknown host version must not break the WebUI
        log.exception("AutoLoRA: could not load its adapter")
        reasons.append(f"the adapter failed to load ({type(exc).__name__}: {exc})")
    log.warning("AutoLoRA is not available on this WebUI: %s", "; ".join(reasons))
    return UnavailableAdapter("; ".join(reasons))
