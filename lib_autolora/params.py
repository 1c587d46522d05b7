"""AutoLoRA's parameters, declared once.

Everything else is derived from `PARAMS`: the settings class, the UI controls and their order
(which is also the positional order of the API's `alwayson_scripts.AutoLoRA.args`), validation
with its bounds, the infotext keys written and pasted back, the X/Y/Z axes, the tooltips and the
controls table in docs/controls.md (`python -m lib_autolora.params` writes it). Host-free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

STRATEGY_CHOICES = ("auto", "batched", "dual", "sequential", "swap")
SCHEDULE_CHOICES = ("constant", "early", "late", "middle")
UNSET = -1.0  # UI/API value of an optional parameter meaning "unset": w1/w2 follow the CFG scale, no cap, ...


class AutoLoraArgumentError(ValueError):
    """Bad AutoLoRA arguments from the API, the UI or an X/Y/Z axis."""


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # bool | float | optional (a float, or unset: -1 / null / `unset` word) | choice | names
    default: Any  # the UI/API default
    label: str
    tooltip: str
    infotext: str
    bounds: Optional[tuple] = None  # (low, high): what the API, the UI and X/Y/Z accept
    slider: Optional[tuple] = None  # (min, max, step): the UI slider's common range, within bounds
    # optional ones: the UI's checkbox for "unset" beside the slider (every position of both valid),
    # and the slider's value while the box is ticked
    unset_label: str = ""
    slider_default: Optional[float] = None
    choices: tuple = ()
    xyz: bool = False  # offered as an X/Y/Z plot axis
    advanced: bool = False
    unset: str = ""  # optional: the infotext word for unset ("cfg", "off", "same") ...
    unset_means: str = ""  # ... and what unset means, for messages and docs

    @property
    def setting_default(self):
        """The default as a settings value (optional ones: None = unset; names: a tuple)."""
        if self.kind == "optional":
            return None
        if self.kind == "names":
            return tuple(n.strip() for n in self.default.split(",") if n.strip())
        return self.default


PARAMS = (
    Param("enabled", "bool", False, "AutoLoRA",
          "Guide the LoRA model with its own base model (the checkpoint without the LoRAs).",
          "AutoLoRA", xyz=True),
    Param("gamma", "float", 1.5, "γ (AutoLoRA scale)",
          "0 = base model only, 1 = the LoRA model as loaded, >1 pushes away from the base model "
          "(paper default 1.5); values below 0 push towards the base model.",
          "AutoLoRA gamma", bounds=(-10.0, 10.0), slider=(-2.0, 5.0, 0.05), xyz=True),
    Param("w1", "optional", UNSET, "w1 (base CFG)",
          "CFG scale of the base branch (ticked: the generation's CFG scale; API: -1).",
          "AutoLoRA w1", bounds=(0.0, 30.0), slider=(0.0, 30.0, 0.5), xyz=True,
          unset="cfg", unset_means="the generation's CFG scale", unset_label="w1 = CFG scale", slider_default=7.0),
    Param("w2", "optional", UNSET, "w2 (LoRA CFG)",
          "CFG scale of the LoRA branch (ticked: the generation's CFG scale; API: -1).",
          "AutoLoRA w2", bounds=(0.0, 30.0), slider=(0.0, 30.0, 0.5), xyz=True,
          unset="cfg", unset_means="the generation's CFG scale", unset_label="w2 = CFG scale", slider_default=7.0),
    Param("lora_scale", "float", 1.0, "LoRA scale",
          "Multiplier on the guided LoRAs' strengths in the LoRA branch (1 = as written in the prompt).",
          "AutoLoRA LoRA scale", bounds=(0.0, 4.0), slider=(0.0, 2.0, 0.05), xyz=True),
    Param("start", "float", 0.0, "Guidance start",
          "Fraction of the sampling steps where AutoLoRA starts; before it, plain LoRA steps.",
          "AutoLoRA start", bounds=(0.0, 1.0), slider=(0.0, 1.0, 0.01), xyz=True),
    Param("end", "float", 1.0, "Guidance end",
          "Fraction of the sampling steps where AutoLoRA stops; after it, plain LoRA steps at no extra cost.",
          "AutoLoRA end", bounds=(0.0, 1.0), slider=(0.0, 1.0, 0.01), xyz=True),
    Param("guided_loras", "names", "", "Guided LoRAs",
          "Comma-separated LoRA names to guide (empty = every LoRA in the prompt). The others stay in "
          "both branches.",
          "AutoLoRA guided", advanced=True),
    Param("strategy", "choice", "auto", "Base-branch strategy",
          "How the base model is evaluated; all give the same image. auto picks by batch size and free "
          "memory; batched = one forward for both branches; dual = one forward, each LoRA'd layer holding "
          "both weights (memory for a copy of those layers); sequential = two forwards, least memory; "
          "swap = two forwards over a copy of the LoRA'd layers' base weights (fast for large batches, "
          "costs memory).",
          "AutoLoRA strategy", choices=STRATEGY_CHOICES, xyz=True, advanced=True),
    Param("base_text_encoder", "bool", True, "Base text encoder without the LoRA",
          "Encode the base branch's prompt with the guided LoRAs removed from the text encoder(s). "
          "Off: both branches share the LoRA'd conditioning.",
          "AutoLoRA base TE", xyz=True, advanced=True),
    Param("schedule", "choice", "constant", "γ schedule",
          "How γ's push beyond the plain LoRA moves over the guided steps: constant; early = strongest at the "
          "first guided step, fading out (composition); late = growing towards the last (detail); middle = "
          "strongest halfway. At the weakest point the push is the floor's share of γ - 1.",
          "AutoLoRA schedule", choices=SCHEDULE_CHOICES, xyz=True),
    Param("schedule_power", "float", 1.0, "Schedule power",
          "Shape of the ramp: 1 = linear (early, late) or a parabola (middle); higher = steeper.",
          "AutoLoRA schedule power", bounds=(0.1, 8.0), slider=(0.25, 4.0, 0.05), xyz=True, advanced=True),
    Param("schedule_floor", "float", 0.0, "Schedule floor",
          "The smallest share of γ - 1 a ramp keeps (0 = down to the plain LoRA step, 1 = constant).",
          "AutoLoRA schedule floor", bounds=(0.0, 1.0), slider=(0.0, 1.0, 0.05), xyz=True, advanced=True),
    Param("cap", "optional", UNSET, "Push cap",
          "Upper bound on AutoLoRA's push γ·(LoRA - base) as a multiple of the LoRA branch's CFG update, per "
          "image, so a high γ or w2 cannot burn it; 0 = the base model (ticked: no cap; API: -1).",
          "AutoLoRA cap", bounds=(0.0, 10.0), slider=(0.0, 3.0, 0.05), xyz=True,
          unset="off", unset_means="off", unset_label="No push cap", slider_default=1.0),
    Param("base_strength", "float", 0.0, "Base LoRA strength",
          "Strength of each guided LoRA in the base branch, as a share of its own strength: 0 = the checkpoint "
          "without it (the paper); between 0 and 1 guides the LoRA with a weaker copy of itself.",
          "AutoLoRA base strength", bounds=(0.0, 1.0), slider=(0.0, 1.0, 0.05), xyz=True),
    Param("hr_gamma", "optional", UNSET, "Hires γ",
          "γ of the hires-fix pass (ticked: the same as the first pass; API: -1 or \"same\").",
          "AutoLoRA hires gamma", bounds=(-10.0, 10.0), slider=(-2.0, 5.0, 0.05), xyz=True, advanced=True,
          unset="same", unset_means="the first pass's γ", unset_label="Hires γ = first pass's γ", slider_default=1.5),
)
# Named starting points in the UI (a preset sets these controls and nothing else), each from a finding.
PRESETS = {
    "Paper: γ 1.5": ({"gamma": 1.5, "schedule": "constant"},
                     "the paper's setting: γ 1.5 on every step, w1 = w2 = the CFG scale"),
    "Middle ramp: γ 2": ({"gamma": 2.0, "schedule": "middle"},
                         "γ 2 strongest halfway through the steps: in the demo, on a LoRA near the checkpoint, most of "
                         "γ's extra variety with half the wrong subjects of a constant γ 2"),
}

BY_NAME = {p.name: p for p in PARAMS}
ARG_ORDER = tuple(p.name for p in PARAMS)
XYZ_PARAMS = tuple(p for p in PARAMS if p.xyz)
# The UI's "unset" checkboxes of the optional parameters, passed after the ARG_ORDER values (the
# API's positional args end before them; named args and -1 say "unset" there).
UNSET_BOXES = tuple(p for p in PARAMS if p.kind == "optional")


@dataclass(frozen=True)
class AutoLoraSettings:
    """One generation's settings: a field per parameter of PARAMS, in its order and with its default
    (a test holds the two together); optional ones are None when unset, names a tuple."""

    enabled: bool = False
    gamma: float = 1.5
    w1: Optional[float] = None
    w2: Optional[float] = None
    lora_scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guided_loras: tuple = ()
    strategy: str = "auto"
    base_text_encoder: bool = True
    schedule: str = "constant"
    schedule_power: float = 1.0
    schedule_floor: float = 0.0
    cap: Optional[float] = None
    base_strength: float = 0.0
    hr_gamma: Optional[float] = None

    def with_overrides(self, overrides: dict) -> "AutoLoraSettings":
        """A copy with X/Y/Z values applied (each validated, then the whole checked again)."""
        return validate(replace(self, **{k: coerce(BY_NAME[k], v) for k, v in overrides.items()}))


# -- validation -------------------------------------------------------------------------------------

def _fmt(x: float) -> str:
    return f"{x:g}"


def _number(param: Param, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise AutoLoraArgumentError(f"AutoLoRA: '{param.name}' must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise AutoLoraArgumentError(f"AutoLoRA: '{param.name}' must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise AutoLoraArgumentError(f"AutoLoRA: '{param.name}' must be finite, got {value!r}")
    if param.bounds is not None and not param.bounds[0] <= number <= param.bounds[1]:
        low, high = param.bounds
        also = f" (or -1 for {param.unset_means})" if param.kind == "optional" else ""
        raise AutoLoraArgumentError(
            f"AutoLoRA: '{param.name}' must be between {_fmt(low)} and {_fmt(high)}{also}, got {_fmt(number)}")
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
        return _number(param, value)
    if param.kind == "optional":
        if value is None or (isinstance(value, str) and value.strip().lower() in (param.unset, "")):
            return None
        if not isinstance(value, bool) and isinstance(value, (int, float)) and value == UNSET:
            return None
        if isinstance(value, str):
            try:
                if float(value) == UNSET:
                    return None
            except ValueError:
                pass
        return _number(param, value)
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


def validate(settings):
    """Rules between parameters (each value is checked on its own by `coerce`)."""
    if settings.start > settings.end:
        raise AutoLoraArgumentError(f"AutoLoRA: 'start' ({settings.start:g}) must not exceed 'end' ({settings.end:g})")
    return settings


def settings_from_args(args):
    """The script's `process(p, *args)` arguments: positional in ARG_ORDER (from the UI followed by
    its UNSET_BOXES), or one dict of named args."""
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
        if len(args) > len(ARG_ORDER) + len(UNSET_BOXES):
            raise AutoLoraArgumentError(
                f"AutoLoRA: got {len(args)} positional args, expected at most {len(ARG_ORDER)}: {', '.join(ARG_ORDER)} "
                f"(the UI sends its {len(UNSET_BOXES)} unset boxes after them)")
        named = {name: coerce(BY_NAME[name], value) for name, value in zip(ARG_ORDER, args)}
        for param, ticked in zip(UNSET_BOXES, args[len(ARG_ORDER):]):
            if param.name in named:  # the UI's box decides; its slider's -1 is a number there
                named[param.name] = None if ticked is True else _number(param, args[ARG_ORDER.index(param.name)])
        return validate(AutoLoraSettings(**named))
    return validate(AutoLoraSettings(**{name: coerce(BY_NAME[name], value) for name, value in named.items()}))


def ui_values(settings) -> list:
    """What the UI's controls show for `settings`: ARG_ORDER's values, then the UNSET_BOXES."""
    values = []
    for p in PARAMS:
        value = getattr(settings, p.name)
        if p.kind == "optional":
            value = p.slider_default if value is None else value
        values.append(", ".join(value) if p.kind == "names" else value)
    return values + [getattr(settings, p.name) is None for p in UNSET_BOXES]


def as_dict(settings) -> dict:
    """Settings as JSON values, by name."""
    return {p.name: list(v) if isinstance(v := getattr(settings, p.name), tuple) else v for p in PARAMS}


# -- infotext ---------------------------------------------------------------------------------------

def _format(p: Param, v) -> str:
    if p.kind == "optional":
        return p.unset if v is None else _fmt(v)
    if p.kind == "float":
        return _fmt(v)
    if p.kind == "names":
        return ", ".join(v)  # the host quotes values holding commas when it writes the infotext
    return str(v)


VERSION_KEY = "AutoLoRA version"
# Follows the strategy that ran when `auto` picked it ("dual (auto)"): the infotext says what ran,
# and pasting restores `auto`, not a strategy the user never chose (an explicit one ignores memory).
PICKED_BY_AUTO = " (auto)"


def strategy_that_ran(requested: str, ran: str) -> str:
    """The infotext's strategy: the one that ran, marked when `auto` picked it."""
    return f"{ran}{PICKED_BY_AUTO}" if requested == "auto" else ran


def infotext_fields(settings, version: str = "") -> dict:
    """An enabled run's infotext: enabled, the version, and every setting that differs from its
    default (pasting restores the rest as defaults); nothing when disabled."""
    if not settings.enabled:
        return {}
    default = AutoLoraSettings()
    fields = {p.infotext: _format(p, getattr(settings, p.name)) for p in PARAMS
              if p.name == "enabled" or getattr(settings, p.name) != getattr(default, p.name)}
    if version:
        fields[VERSION_KEY] = version
    return fields


def _from_infotext(param: Param, raw):
    """An infotext value: its word for unset ("cfg", "off", "same") is unset, a number a number
    (hires γ -1 included); a bad value is the default."""
    if param.name == "strategy" and str(raw).endswith(PICKED_BY_AUTO):
        return "auto"
    try:
        if param.kind == "optional":
            return None if str(raw).strip().lower() == param.unset else _number(param, raw)
        return coerce(param, raw)
    except AutoLoraArgumentError:
        return param.setting_default


def paste_value(param: Param, infotext: dict):
    """The UI value for `param` restored from a parsed infotext (missing keys: the default; an
    enabled key missing: off)."""
    raw = infotext.get(param.infotext)
    if raw is None:
        return False if param.name == "enabled" else ui_values(AutoLoraSettings())[ARG_ORDER.index(param.name)]
    value = _from_infotext(param, raw)
    if param.kind == "optional":
        return param.slider_default if value is None else value
    return ", ".join(value) if param.kind == "names" else value


def paste_unset(param: Param, infotext: dict) -> bool:
    """The UI's "unset" box of an optional `param` restored from a parsed infotext."""
    raw = infotext.get(param.infotext)
    return raw is None or _from_infotext(param, raw) is None


# -- X/Y/Z and docs -----------------------------------------------------------------------------------

def xyz_label(p: Param) -> str:
    return "[AutoLoRA] Enabled" if p.name == "enabled" else f"[AutoLoRA] {p.label}"


def table_json() -> dict:
    """The parameter table as JSON (GET /autolora/v1/params, the UI's tooltips)."""
    return {"title": "AutoLoRA", "arg_order": list(ARG_ORDER), "unset": UNSET,
            "params": [{"name": p.name, "kind": p.kind, "default": p.default, "label": p.label,
                        "tooltip": p.tooltip, "infotext": p.infotext,
                        "bounds": list(p.bounds) if p.bounds else None,
                        "slider": list(p.slider) if p.slider else None, "choices": list(p.choices),
                        "xyz": p.xyz, "advanced": p.advanced} for p in PARAMS]}


def _accepts(p: Param) -> str:
    if p.kind == "bool":
        return "true / false"
    if p.kind == "choice":
        return " / ".join(f"`{c}`" for c in p.choices)
    if p.kind == "names":
        return "comma-separated LoRA names, or a list"
    text = f"{_fmt(p.bounds[0])} … {_fmt(p.bounds[1])}"
    return text + f" or -1 / `\"{p.unset}\"` ({p.unset_means})" if p.kind == "optional" else text


def positional_example() -> list:
    """The API's positional args of an enabled run with every other default, as JSON values."""
    return [True if p.name == "enabled" else (UNSET if p.kind == "optional" else p.default) for p in PARAMS]


def controls_markdown() -> str:
    """docs/controls.md: the controls table, generated from PARAMS (a test keeps the file equal)."""
    import json
    lines = ["# AutoLoRA's controls", "",
             "Generated from the parameter table (`python -m lib_autolora.params > docs/controls.md`); the "
             "UI, the API, the infotext and the X/Y/Z axes all follow it. The API takes these in this "
             "order as positional `args`, or as one object of named args (missing names take their "
             "defaults). In the UI, w1, w2, the cap and hires γ are a slider over their range with a "
             "box beside it for their unset meaning; the API says it with -1, `null` or the word.", "",
             "| # | API name | UI label | where | default | accepted | infotext key | X/Y/Z | what it does |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, p in enumerate(PARAMS):
        default = f"-1 ({p.unset})" if p.kind == "optional" else (f"`{p.default}`" if p.default != "" else "(empty)")
        where = "header" if p.name == "enabled" else ("Advanced" if p.advanced else "main")
        label = f"{p.label} + box *{p.unset_label}*" if p.kind == "optional" else p.label
        lines.append(f"| {i} | `{p.name}` | {label} | {where} | {default} | {_accepts(p)} | `{p.infotext}` | "
                     f"{'yes' if p.xyz else ''} | {p.tooltip} |")
    lines += ["", "X/Y/Z axes, labelled as in the plot script: " +
              ", ".join(xyz_label(p) for p in XYZ_PARAMS) + ".", "",
              "Positional args of an enabled run with every default (the same as `[{\"enabled\": true}]`):", "",
              f"    {json.dumps(positional_example(), ensure_ascii=False)}", "",
              f"Every guided image's infotext holds `AutoLoRA: True`, `{VERSION_KEY}` and each setting that "
              "differs from its default, and the strategy that ran (`dual (auto)` when `auto` picked it); "
              "pasting restores every control (a key that is missing is the default; a strategy `auto` picked "
              "pastes as `auto`)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(controls_markdown(), end="")
