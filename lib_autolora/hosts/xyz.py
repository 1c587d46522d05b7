"""AutoLoRA's axes in the hosts' X/Y/Z plot script, built from `params.XYZ_PARAMS` with the
script's own classes. A cell's value is stored on `p` and applied over the script's args when the
generation starts (`settings_for`)."""
from __future__ import annotations

from typing import Optional

from .. import params

OVERRIDES_ATTR = "autolora_overrides"  # set on `p` by the X/Y/Z axes


def settings_for(p, args):
    """The script's args with the X/Y/Z overrides stored on `p` applied over them."""
    settings = params.settings_from_args(args)
    overrides = getattr(p, OVERRIDES_ATTR, None) or {}
    return settings.with_overrides(overrides) if overrides else settings


def apply_override(p, name: str, value) -> None:
    """Store one X/Y/Z value on `p`. The grid shallow-copies `p` per cell, so the dict is replaced,
    never mutated."""
    setattr(p, OVERRIDES_ATTR, {**(getattr(p, OVERRIDES_ATTR, None) or {}), name: value})


def axis_options(xyz_module) -> list:
    """AxisOptions for every `params.XYZ_PARAMS`."""
    options = []
    for param in params.XYZ_PARAMS:
        def apply(p, x, xs, _param=param):
            apply_override(p, _param.name, params.coerce(_param, x))

        def confirm(p, xs, _param=param):
            for x in xs:
                params.coerce(_param, x)  # raises AutoLoraArgumentError naming the value

        if param.kind == "bool":
            # The choices A1111's boolean_choice(reverse=True) gives, written out: Forge Classic's
            # X/Y/Z script (extensions-builtin/xyz) keeps that helper in another module.
            options.append(xyz_module.AxisOption(params.xyz_label(param), str, apply, confirm=confirm,
                                                 choices=lambda: ["False", "True"]))
        elif param.kind == "choice":
            options.append(xyz_module.AxisOption(params.xyz_label(param), str, apply, confirm=confirm,
                                                 choices=lambda _param=param: list(_param.choices)))
        else:
            options.append(xyz_module.AxisOption(params.xyz_label(param), float, apply, confirm=confirm))
    return options


def add_axes(xyz_module) -> int:
    """Append the AutoLoRA axes to the X/Y/Z script's `axis_options` once; returns how many were added."""
    have = {getattr(o, "label", None) for o in xyz_module.axis_options}
    new = [o for o in axis_options(xyz_module) if o.label not in have]
    xyz_module.axis_options.extend(new)
    return len(new)


def find_module(scripts_data) -> Optional[object]:
    """The loaded X/Y/Z plot script module (as other extensions find it)."""
    for data in scripts_data:
        if getattr(data.script_class, "__module__", "") == "xyz_grid.py" and hasattr(data.module, "axis_options"):
            return data.module
    return None


def register() -> bool:
    """Add the axes to the host's X/Y/Z script, if it is loaded yet (then True). A script whose
    axis classes differ from A1111's costs the axes only, never the extension: logged, True."""
    from modules import scripts  # the host's script registry (A1111 and the Forge family alike)
    module = find_module(scripts.scripts_data)
    if module is None:
        return False
    try:
        add_axes(module)
    except Exception as exc:  # noqa: BLE001 - any host's X/Y/Z variant; the rest of AutoLoRA must load
        print(f"AutoLoRA: no X/Y/Z axes on this WebUI ({type(exc).__name__}: {exc})")
    return True
