"""The LoRAs a prompt names, and which of the loaded ones AutoLoRA guides."""
from __future__ import annotations

import re
from typing import Sequence

from .params import AutoLoraArgumentError

# The extra-network syntax both hosts parse: <lora:name>, <lora:name:0.8>, <lora:name:te=1:unet=0.5>.
LORA_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)(?::[^>]*)?>", re.IGNORECASE)


def lora_names_in_prompt(*prompts) -> list:
    """Names of the LoRAs the prompts mention, in order of first appearance."""
    names = []
    for prompt in prompts:
        texts = prompt if isinstance(prompt, (list, tuple)) else [prompt]
        for text in texts:
            if not isinstance(text, str):
                continue
            for name in LORA_TAG.findall(text):
                name = name.strip()
                if name and name not in names:
                    names.append(name)
    return names


def not_in_prompt(requested: Sequence[str], in_prompt: Sequence[str]) -> AutoLoraArgumentError:
    return AutoLoraArgumentError(
        f"AutoLoRA: guided LoRA(s) {', '.join(map(repr, requested))} not in the prompt; "
        f"the prompt's LoRAs: {', '.join(map(str, in_prompt)) or 'none'}")


def select_guided(loaded: Sequence[tuple], requested: Sequence[str]) -> list:
    """Which loaded LoRAs the base branch removes.

    `loaded`: (key, names...) per LoRA the host activated, where names are every name the user may
    write for it (the name in the prompt, the file name, the alias). Empty `requested` guides all.
    Returns the keys of the guided LoRAs; an unknown name raises AutoLoraArgumentError.
    """
    if not requested:
        return [entry[0] for entry in loaded]
    guided, unknown = [], []
    for name in requested:
        hits = [entry[0] for entry in loaded
                if name.lower() in {n.lower() for n in entry[1:] if isinstance(n, str)}]
        if not hits:
            unknown.append(name)
        for key in hits:
            if key not in guided:
                guided.append(key)
    if unknown:
        raise not_in_prompt(unknown, [entry[1] for entry in loaded])
    return guided
