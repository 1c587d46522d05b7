"""AutoLoRA's parameters, declared once.

The UI controls, their order (which is also the positional order of the API's
`alwayson_scripts.AutoLoRA.args`), API validation, the infotext keys written and pasted back, the
X/Y/Z axes and the tooltips are all derived from `PARAMS`. Host-free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

STRATEGY_CHOICES = ("auto", "batched", "dual", "sequential", "swap", "toggle")
FOLLOW_CFG = -1.0  # UI/API value of w1/w2 meaning "the generation's CFG scale"


class AutoLoraArgumentError(ValueError):
    """Bad AutoLoRA arguments from the API, the UI or an X/Y/Z axis."""


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # bool | float | cfg (float or follow CFG) | choice | names
    default: Any
    label: str
    tooltip: str
    infotext: str
    minimum: Optional[float] = None  # UI slider range; API values outside are accepted if valid
    maximum: Optional[float] = None
    step: Optional[float] = None
    choices: tuple = ()
    xyz: bool = False  # offered as an X/Y/Z plot axis
    advanced: bool = False


PARAMS = (
    Param("enabled", "bool", False, "AutoLoRA",
          "Guide the LoRA model with its own base model (the checkpoint without the LoRAs).",
          "AutoLoRA", xyz=True),
    Param("gamma", "float", 1.5, "γ (AutoLoRA scale)",
          "0 = base model only, 1 = the LoRA model as loaded, >1 pushes away from the base model "
          "(paper default 1.5). Any real number.",
          "AutoLoRA gamma", -2.0, 5.0, 0.05, xyz=True),
    Param("w1", "cfg", FOLLOW_CFG, "w1 (base CFG)",
          "CFG scale of the base branch. -1 = the generation's CFG scale.",
          "AutoLoRA w1", -1.0, 30.0, 0.5, xyz=True),
    Param("w2", "cfg", FOLLOW_CFG, "w2 (LoRA CFG)",
          "CFG scale of the LoRA branch. -1 = the generation's CFG scale.",
          "AutoLoRA w2", -1.0, 30.0, 0.5, xyz=True),
    Param("lora_scale", "float", 1.0, "LoRA scale",
          "Multiplier on the guided LoRAs' strengths in the LoRA branch (1 = as written in the prompt).",
          "AutoLoRA LoRA scale", 0.0, 2.0, 0.05, xyz=True),
    Param("start", "float", 0.0, "Guidance start",
          "Fraction of the sampling steps where AutoLoRA starts; before it, plain LoRA steps.",
          "AutoLoRA start", 0.0, 1.0, 0.01, xyz=True),
    Param("end", "float", 1.0, "Guidance end",
          "Fraction of the sampling steps where AutoLoRA stops; after it, plain LoRA steps at no extra cost.",
          "AutoLoRA end", 0.0, 1.0, 0.01, xyz=True),
    Param("guided_loras", "names", "", "Guided LoRAs",
          "Comma-separated LoRA names to guide (empty = every LoRA in the prompt). The others stay in "
          "both branches.",
          "AutoLoRA guided", advanced=True),
    Param("strategy", "choice", "auto", "Base-branch strategy",
          "How the base model is evaluated: auto picks by batch size and free memory; batched = one "
          "forward for both branches; dual = one forward, each LoRA'd layer holding both weights (two "
          "copies of the LoRA'd layers; measured no faster than batched); sequential = two forwards, least "
          "memory; swap = a copy of the LoRA'd layers' base weights (fastest when compute-bound, costs "
          "memory); toggle = restore and re-merge the weights every step (slow; the benchmark's reference).",
          "AutoLoRA strategy", choices=STRATEGY_CHOICES, advanced=True),
    Param("base_text_encoder", "bool", True, "Base text encoder without the LoRA",
          "Encode the base branch's prompt with the guided LoRAs removed from the text encoder(s). "
          "Off: both branches share the LoRA'd conditioning.",
          "AutoLoRA base TE", advanced=True),
)
BY_NAME = {p.name: p for p in PARAMS}
BY_INFOTEXT = {p.infotext: p for p in PARAMS}
ARG_ORDER = tuple(p.name for p in PARAMS)


@dataclass(frozen=True)
class AutoLoraSettings:
    enabled: bool = False
    gamma: float = 1.5
    w1: Optional[float] = None  # None = the generation's CFG scale
    w2: Optional[float] = None
    lora_scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guided_loras: tuple = ()  # empty = every LoRA in the prompt
    strategy: str = "auto"
    base_text_encoder: bool = True

    def with_overrides(self, overrides: dict) -> "AutoLoraSettings":
        return replace(self, **{k: coerce(BY_NAME[k], v) for k, v in overrides.items()})


# -- coercion ---------------------------------------------------------------------------------------

def _number(param: Param, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise AutoLoraArgumentError(f"AutoLoRA: '{param.name}' must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise AutoLoraArgumentError(f"AutoLoRA: '{param.name}' must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise AutoLoraArgumentError(f"AutoLoRA: '{param.name}' must be finite, got {value!r}")
    return number


def coerce(param: Param, value):
    """API/UI/XYZ value -> the settings value, or AutoLoraArgumentError saying what is wrong."""
    if param.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise AutoLoraArgumentError(f"AutoLoRA: '{param.name}' must be true or false, got {value!r}")
    if param.kind == "float":
        number = _number(param, value)
        if param.name in ("start", "end") and not 0.0 <= number <= 1.0:
            raise AutoLoraArgumentError(f"AutoLoRA: '{param.name}' is a fraction of the steps in [0, 1], got {number}")
        if param.name == "lora_scale" and number < 0:
            raise AutoLoraArgumentError(f"AutoLoRA: 'lora_scale' must be >= 0, got {number}")
        return number
    if param.kind == "cfg":
        if value is None or (isinstance(value, str) and value.strip().lower() in ("cfg", "")):
            return None
        number = _number(param, value)
        if number == FOLLOW_CFG:
            return None
        if number < 0:
            raise AutoLoraArgumentError(
                f"AutoLoRA: '{param.name}' must be >= 0, or -1 / null / \"cfg\" for the generation's CFG scale; "
                f"got {number}")
        return number
    if param.kind == "choice":
        if not isinstance(value, str) or value.strip().lower() not in param.choices:
            raise AutoLoraArgumentError(
                f"AutoLoRA: '{param.name}' must be one of {', '.join(param.choices)}; got {value!r}")
        return value.strip().lower()
    if param.kind == "names":
        if isinstance(value, str):
            names = [n.strip() for n in value.split(",")]
        elif isinstance(value, (list, tuple)) and all(isinstance(n, str) for n in value):
            names = [n.strip() for n in value]
        else:
            raise AutoLoraArgumentError(
                f"AutoLoRA: '{param.name}' must be a comma-separated string or a list of LoRA names, got {value!r}")
        return tuple(n for n in names if n)
    raise AssertionError(param.kind)


def settings_from_args(args) -> AutoLoraSettings:
    """The script's `process(p, *args)` arguments: positional in ARG_ORDER, or one dict of named args."""
    args = list(args or [])
    if args and isinstance(args[0], dict):
        # One dict of named args. The hosts' API places it in the first slot and fills the others
        # with the UI defaults, which are ignored here.
        named = args[0]
        unknown = sorted(set(named) - set(ARG_ORDER))
        if unknown:
            raise AutoLoraArgumentError(
                f"AutoLoRA: unknown argument(s) {', '.join(map(repr, unknown))}; known: {', '.join(ARG_ORDER)}")
    else:
        if len(args) > len(ARG_ORDER):
            raise AutoLoraArgumentError(
                f"AutoLoRA: got {len(args)} positional args, expected at most {len(ARG_ORDER)}: {', '.join(ARG_ORDER)}")
        named = dict(zip(ARG_ORDER, args))
    values = {name: coerce(BY_NAME[name], value) for name, value in named.items()}
    settings = AutoLoraSettings(**values)
    if settings.start > settings.end:
        raise AutoLoraArgumentError(f"AutoLoRA: 'start' ({settings.start}) must not exceed 'end' ({settings.end})")
    return settings


def ui_values(settings: AutoLoraSettings) -> list:
    """Settings -> the UI components' values, in ARG_ORDER."""
    out = []
    for p in PARAMS:
        v = getattr(settings, p.name)
        if p.kind == "cfg":
            v = FOLLOW_CFG if v is None else v
        elif p.kind == "names":
            v = ", ".join(v)
        out.append(v)
    return out


# -- infotext ---------------------------------------------------------------------------------------

def _format(p: Param, v) -> str:
    if p.kind == "cfg":
        return "cfg" if v is None else f"{v:g}"
    if p.kind == "float":
        return f"{v:g}"
    if p.kind == "names":
        return ", ".join(v)  # the host quotes values holding commas when it writes the infotext
    return str(v)


def infotext_fields(settings: AutoLoraSettings) -> dict:
    """Every setting of an enabled run, by infotext key (nothing when disabled)."""
    if not settings.enabled:
        return {}
    fields_ = {}
    for p in PARAMS:
        value = getattr(settings, p.name)
        text = _format(p, value)
        if text != "":
            fields_[p.infotext] = text
    return fields_


def paste_value(param: Param, infotext: dict):
    """The UI value for `param` restored from a parsed infotext (missing keys -> the default/off)."""
    raw = infotext.get(param.infotext)
    if raw is None:
        if param.name == "enabled":
            return False
        return FOLLOW_CFG if param.kind == "cfg" else param.default
    try:
        value = coerce(param, raw)
    except AutoLoraArgumentError:
        return param.default
    if param.kind == "cfg":
        return FOLLOW_CFG if value is None else value
    if param.kind == "names":
        return ", ".join(value)
    return value


def settings_from_infotext(infotext: dict) -> AutoLoraSettings:
    return settings_from_args([paste_value(p, infotext) for p in PARAMS])


# -- X/Y/Z ------------------------------------------------------------------------------------------

XYZ_PARAMS = tuple(p for p in PARAMS if p.xyz)


def xyz_label(p: Param) -> str:
    return "[AutoLoRA] Enabled" if p.name == "enabled" else f"[AutoLoRA] {p.label}"


def xyz_value(p: Param, text):
    """An X/Y/Z cell value (a string the grid parsed, or a number) -> validated settings value."""
    return coerce(p, text)
