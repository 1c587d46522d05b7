"""The hosts' built-in LoRA extension (`extensions-builtin/Lora` on A1111, `sd_forge_lora` on the
Forge family): both publish the LoRAs activated for the current batch as `networks.loaded_networks`,
each a `Network` with its name, the name written in the prompt and its file on disk."""
from __future__ import annotations

import sys
from typing import Optional


def networks_module():
    """The loaded `networks` module, or None when the built-in LoRA extension is not loaded."""
    module = sys.modules.get("networks")
    if module is None or not hasattr(module, "loaded_networks"):
        try:
            import networks as module  # on sys.path while the host loads its built-in extensions
        except ImportError:
            return None
    return module if hasattr(module, "loaded_networks") else None


def names_of(net) -> tuple:
    """Every name a user may write for a loaded LoRA: its name, the name in the prompt, the file
    name and the alias (for `guided_loras`)."""
    disk = getattr(net, "network_on_disk", None)
    return (net.name, getattr(net, "mentioned_name", None), getattr(disk, "name", None), getattr(disk, "alias", None))


def loaded() -> Optional[list]:
    """The Network objects of the current batch; None without the built-in LoRA extension."""
    module = networks_module()
    return None if module is None else list(module.loaded_networks)
