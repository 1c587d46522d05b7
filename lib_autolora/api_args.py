"""The `alwayson_scripts["AutoLoRA"]` entry of a txt2img/img2img request, checked before the host
runs it: the hosts' script runner logs and swallows a script's exceptions, so a bad value would
otherwise be ignored silently. lib_autolora/hosts/http.py binds it to the routes."""
from __future__ import annotations

from typing import Optional

from . import params
from .params import AutoLoraArgumentError
from .prompts import lora_names_in_prompt, not_in_prompt

SCRIPT_TITLE = "AutoLoRA"


def _script_entry(alwayson: dict):
    for key, value in alwayson.items():
        if isinstance(key, str) and key.lower() == SCRIPT_TITLE.lower():
            return key, value
    return None, None


def check_and_normalize(body, unavailable: Optional[str] = None) -> Optional[str]:
    """The error message for a bad AutoLoRA entry of a request body, or None. `unavailable`: why
    AutoLoRA cannot run on this WebUI (an enabled request is refused with it).

    The one rewrite, done in place: the args become `[{...named args...}]`, the form the hosts pass
    to the script. For positional args this matters: the host fills the slots after them with the
    UI's values, among them the UI's "unset" boxes, which must not override what the client sent.
    """
    if not isinstance(body, dict):
        return None
    alwayson = body.get("alwayson_scripts")
    if not isinstance(alwayson, dict):
        return None
    key, entry = _script_entry(alwayson)
    if key is None:
        return None
    if not isinstance(entry, dict):
        return (f"AutoLoRA: alwayson_scripts.{key} must be an object like {{\"args\": [...]}}, "
                f"got {type(entry).__name__}")
    unknown_keys = sorted(set(entry) - {"args"})
    if unknown_keys:
        return f"AutoLoRA: alwayson_scripts.{key} takes only \"args\", got {', '.join(unknown_keys)}"
    args = entry.get("args", [])
    if isinstance(args, dict):
        args = entry["args"] = [args]
    if not isinstance(args, list):
        return (f"AutoLoRA: alwayson_scripts.{key}.args must be a list of positional args "
                f"({', '.join(params.ARG_ORDER)}) or one object of named args; got {type(args).__name__}")
    if any(isinstance(a, dict) for a in args[1:]):
        return "AutoLoRA: named args go in one object in the first slot of args"
    try:
        settings = params.settings_from_args(args)
    except AutoLoraArgumentError as exc:
        return str(exc)
    entry["args"] = [params.as_dict(settings)]
    if settings.enabled and unavailable:
        return f"AutoLoRA is not available on this WebUI: {unavailable}"
    if settings.enabled and settings.guided_loras and not body.get("styles"):
        # Styles may add LoRAs to the prompt; with styles the check happens when the batch starts.
        in_prompt = lora_names_in_prompt(body.get("prompt"), body.get("hr_prompt"))
        lower = {n.lower() for n in in_prompt}
        unknown = [n for n in settings.guided_loras if n.lower() not in lower]
        if unknown:
            return str(not_in_prompt(unknown, in_prompt))
    return None
