"""AutoLoRA AlwaysOn script: UI, argument plumbing and infotext, all derived from lib_autolora.params.

The method lives in lib_autolora (host-free); lib_autolora.hosts picks the adapter that binds it to
this WebUI (A1111 or Forge). This file only wires the WebUI's script hooks to the adapter.
"""
from __future__ import annotations

import html
import json
import logging
import os
import sys

import gradio as gr

from modules import script_callbacks, scripts, shared

try:
    from modules.ui_components import InputAccordion
except ImportError:  # very old WebUIs
    InputAccordion = None
try:
    from modules.ui_components import ToolButton  # the WebUI's one-symbol button beside a dropdown
except ImportError:
    def ToolButton(*args, **kwargs):
        return gr.Button(*args, elem_classes=["tool"], **kwargs)

_EXTENSION_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _EXTENSION_DIR not in sys.path:  # for `lib_autolora`; appended, so the folder's demo/ and tests/
    sys.path.append(_EXTENSION_DIR)  # never shadow a module of the WebUI
from lib_autolora import params, stats  # noqa: E402
from lib_autolora.hosts import http, select_adapter, xyz  # noqa: E402
from lib_autolora.prompts import lora_names_in_prompt  # noqa: E402
from lib_autolora.params import AutoLoraArgumentError  # noqa: E402

log = logging.getLogger("autolora")
ADAPTER = select_adapter()
SETTINGS_ATTR = "_autolora_settings"
# ADetailer marks the img2img pass it runs per detected face (with AutoLoRA when the user lists it);
# that pass's infotext is dropped, so the image's own infotext says the pass was guided.
DETAILER_PASS_ATTR = "_ad_inner"
DETAILER_KEY = "AutoLoRA ADetailer"
TITLE = "AutoLoRA"


def _image_of(p) -> tuple:
    """The image the host's image loop is at: (batch number, position in the batch)."""
    return getattr(p, "iteration", 0), getattr(p, "batch_index", 0)


def elem_id(tab: str, name: str) -> str:
    """DOM id of a control; javascript/autolora.js finds the controls by it."""
    return f"autolora_{tab}_{name}"


def _component(param, tab):
    kwargs = dict(label=param.label, elem_id=elem_id(tab, param.name))
    if param.kind in ("float", "optional"):
        low, high, step = param.slider  # within the bounds: every position is a valid value
        value = param.slider_default if param.kind == "optional" else param.default
        if param.name == "gamma":
            value = getattr(shared.opts, "autolora_default_gamma", value)  # the user's own default
        return gr.Slider(minimum=low, maximum=high, step=step, value=float(value), **kwargs)
    if param.kind == "bool":
        return gr.Checkbox(value=bool(param.default), **kwargs)
    if param.kind == "choice":
        return gr.Dropdown(choices=list(param.choices), value=param.default, **kwargs)
    if param.kind == "names":
        return gr.Textbox(value=param.default, placeholder="all LoRAs in the prompt", lines=1, **kwargs)
    raise AssertionError(param.kind)


def _controls(params_, tab, controls: dict, unset_boxes: dict) -> None:
    """The controls of `params_`, two to a row; an optional one with its "unset" box beside it."""
    for pair in (params_[i:i + 2] for i in range(0, len(params_), 2)):
        with gr.Row():
            for param in pair:
                if param.kind == "optional":
                    unset_boxes[param.name] = gr.Checkbox(value=True, label=param.unset_label,
                                                          elem_id=elem_id(tab, f"{param.name}_unset"))
                controls[param.name] = _component(param, tab)


def _tooltips(tab):
    """The table's tooltips, carried in the page for javascript/autolora.js (no request needed)."""
    tips = {p.name: p.tooltip for p in params.PARAMS} | {f"{p.name}_unset": p.tooltip for p in params.UNSET_BOXES}
    data = html.escape(json.dumps(tips), quote=True)
    return gr.HTML(f'<div id="{elem_id(tab, "tooltips")}" data-tooltips="{data}" hidden></div>',
                   elem_id=elem_id(tab, "tooltips_block"))


def _paste(param):
    return lambda infotext: params.paste_value(param, infotext)


def _paste_unset(param):
    return lambda infotext: params.paste_unset(param, infotext)


def _strip_infotext(p) -> None:
    for key in [param.infotext for param in params.PARAMS] + [params.VERSION_KEY]:
        p.extra_generation_params.pop(key, None)


def _lora_picker(tab, textbox, prompt) -> None:
    """Beside the guided-LoRA names (the textbox the API and X/Y/Z use): pick from the LoRAs the
    prompt names, read when ↻ is clicked."""
    with gr.Row():
        pick = gr.Dropdown(choices=[], value=[], multiselect=True, label="Pick from the prompt's LoRAs",
                           elem_id=elem_id(tab, "guided_pick"))
        refresh = ToolButton("↻", elem_id=elem_id(tab, "guided_refresh"))
    refresh.click(fn=lambda text: gr.update(choices=lora_names_in_prompt(text)), inputs=[prompt], outputs=[pick])
    pick.change(fn=lambda names: ", ".join(names or []), inputs=[pick], outputs=[textbox])


def _presets(tab, controls: dict) -> None:
    """A preset sets its controls (and leaves the others as they are)."""
    names = sorted({name for values, _ in params.PRESETS.values() for name in values})
    info = "; ".join(f"{label}: {why}" for label, (_values, why) in params.PRESETS.items())
    preset = gr.Dropdown(choices=list(params.PRESETS), value=None, label="Preset", info=info,
                         elem_id=elem_id(tab, "preset"))

    def apply(label):
        values = params.PRESETS[label][0] if label in params.PRESETS else {}
        return [gr.update(value=values[name]) if name in values else gr.update() for name in names]

    preset.change(fn=apply, inputs=[preset], outputs=[controls[name] for name in names])


class AutoLoraScript(scripts.Script):
    def __init__(self):
        self.prompts = {}  # tab -> the WebUI's prompt box, for the guided-LoRA picker
        self.job = None  # the running job (`p`), whose images' postprocessing may run a detailer pass
        self.detailed = set()  # the job's images whose detailer pass was guided (_image_of)
        for tab in ("txt2img", "img2img"):
            self.on_after_component(lambda c, tab=tab: self.prompts.__setitem__(tab, c.component),
                                    elem_id=f"{tab}_prompt")

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        tab = "img2img" if is_img2img else "txt2img"
        enabled_param = params.BY_NAME["enabled"]
        label = enabled_param.label if ADAPTER.available else f"{enabled_param.label} (not available on this WebUI)"
        controls = {}
        accordion_id = elem_id(tab, "enabled")
        if InputAccordion is not None:
            container = InputAccordion(_enabled_by_default(), label=label, elem_id=accordion_id)
            controls["enabled"] = container
        else:
            container = gr.Accordion(label, open=False)
        with container:
            if not ADAPTER.available:
                gr.HTML(f"<p>AutoLoRA is not available on this WebUI: {html.escape(ADAPTER.reason)}. "
                        f"Images are generated without it.</p>", elem_id=elem_id(tab, "unavailable"))
            if InputAccordion is None:
                controls["enabled"] = gr.Checkbox(_enabled_by_default(), label="Enable", elem_id=accordion_id)
            unset_boxes = {}
            _controls([p for p in params.PARAMS if p.name != "enabled" and not p.advanced], tab, controls, unset_boxes)
            with gr.Accordion("Advanced", open=False, elem_id=elem_id(tab, "advanced")):
                _controls([p for p in params.PARAMS if p.advanced], tab, controls, unset_boxes)
                if self.prompts.get(tab) is not None:
                    _lora_picker(tab, controls["guided_loras"], self.prompts[tab])
            _presets(tab, controls)
            _tooltips(tab)
        self.infotext_fields = [(controls[p.name], _paste(p)) for p in params.PARAMS] + [
            (unset_boxes[p.name], _paste_unset(p)) for p in params.UNSET_BOXES]
        self.paste_field_names = [p.infotext for p in params.PARAMS]
        return [controls[name] for name in params.ARG_ORDER] + [unset_boxes[p.name] for p in params.UNSET_BOXES]

    def process(self, p, *args):
        if getattr(p, DETAILER_PASS_ATTR, False):
            ADAPTER.suspend()  # the job's generation waits while the detailer pass runs its own
        elif not self._reprocess_of_job(p):
            ADAPTER.finish(None)  # earlier generations whose postprocess never ran (they raised)
            self.job, self.detailed = p, set()
            p.extra_generation_params.pop(DETAILER_KEY, None)  # an earlier job's, in a shared dict
        setattr(p, SETTINGS_ATTR, None)
        try:
            settings = xyz.settings_for(p, args)
        except AutoLoraArgumentError as exc:
            log.error("%s", exc)
            p.comment(f"{exc}; generated without AutoLoRA")
            return
        if settings.enabled:
            setattr(p, SETTINGS_ATTR, settings)

    def _reprocess_of_job(self, p) -> bool:
        """ADetailer calls every script's process again on a shallow copy of the running job after its
        batch's last image (so that scripts set up the job's next batch): that is the same job. A new
        job (an X/Y/Z cell, also a copy sharing the params dict) starts after the last one's
        postprocess and before its own image loop, so without a batch_index."""
        return (self.job is not None and p is not self.job and hasattr(p, "batch_index")
                and p.extra_generation_params is self.job.extra_generation_params)

    def process_batch(self, p, *args, **kwargs):
        settings = getattr(p, SETTINGS_ATTR, None)
        if settings is None:
            return
        try:
            notice = ADAPTER.start_batch(p, settings)
        except Exception as exc:  # the host would swallow it; make it visible and turn AutoLoRA off
            self._fail(p, exc)
            return
        if notice:
            log.info("%s", notice)
            p.comment(notice)

    def process_before_every_sampling(self, p, *args, **kwargs):
        if getattr(p, SETTINGS_ATTR, None) is None:
            return
        try:
            ADAPTER.before_sampling(p, **kwargs)
        except Exception as exc:
            self._fail(p, exc)

    def postprocess_batch(self, p, *args, **kwargs):
        """After sampling, before the host writes the batch's infotexts: the images claim AutoLoRA
        only when at least one of their steps was guided."""
        gen = ADAPTER.generation(p)
        if gen is None:
            return
        if gen.batch_was_guided():
            p.extra_generation_params.update(gen.infotext_fields())
            if getattr(p, DETAILER_PASS_ATTR, False) and self.job is not None:
                self.detailed.add(_image_of(self.job))
                self.job.extra_generation_params[DETAILER_KEY] = "guided"
        else:
            _strip_infotext(p)
            gen.note("AutoLoRA: no step of this batch was guided; generated without AutoLoRA", p.comment)

    def postprocess_image(self, p, pp, *args):
        """The host writes each image's infotext from the outer params after every script's
        postprocess_image: it names the detailer pass only if this image's was guided, whether
        ADetailer's postprocess_image (which runs the pass) came before this one or comes after."""
        if p is not self.job or getattr(p, DETAILER_PASS_ATTR, False):
            return
        if _image_of(p) in self.detailed:
            p.extra_generation_params[DETAILER_KEY] = "guided"
        else:
            p.extra_generation_params.pop(DETAILER_KEY, None)

    def postprocess(self, p, processed, *args):
        """The generation ends; one line under the images says what AutoLoRA did."""
        gen = ADAPTER.generation(p)
        ADAPTER.finish(p)
        if p is self.job:
            self.job = None
        if gen is not None and gen.stats.active and processed is not None:
            processed.comments = f"{getattr(processed, 'comments', '') or ''}{gen.stats.summary()}\n"

    def _fail(self, p, exc):
        if isinstance(exc, AutoLoraArgumentError):
            log.error("%s", exc)
        else:
            log.exception("AutoLoRA failed")
        gen = ADAPTER.generation(p)
        ADAPTER.finish(p)
        setattr(p, SETTINGS_ATTR, None)
        _strip_infotext(p)
        if gen is not None:  # its record, not the last one begun (a detailer pass's, inside this job)
            gen.stats.active = False
        p.comment(f"{exc if isinstance(exc, AutoLoraArgumentError) else f'AutoLoRA failed: {exc}'}; "
                  f"generated without AutoLoRA")


def _enabled_by_default() -> bool:
    return bool(getattr(shared.opts, "autolora_enabled_by_default", False))


def on_ui_settings():
    section = ("autolora", "AutoLoRA")
    shared.opts.add_option("autolora_enabled_by_default", shared.OptionInfo(
        False, "AutoLoRA ticked when the UI opens (API requests without AutoLoRA's args run it too)",
        section=section))
    gamma = params.BY_NAME["gamma"]
    shared.opts.add_option("autolora_default_gamma", shared.OptionInfo(
        gamma.default, "AutoLoRA's γ when the UI opens", gr.Slider,
        {"minimum": gamma.slider[0], "maximum": gamma.slider[1], "step": gamma.slider[2]}, section=section))
    shared.opts.add_option("autolora_default_strategy", shared.OptionInfo(
        "auto", "Base-branch strategy used when a generation asks for 'auto'", gr.Dropdown,
        {"choices": list(params.STRATEGY_CHOICES)}, section=section).info(
        "auto = by batch size and free memory; sequential = least memory"))
    shared.opts.add_option("autolora_swap_budget_mb", shared.OptionInfo(
        0, "Memory budget of the 'swap' and 'dual' strategies (MB of base weights kept on the device; 0 = free memory)",
        gr.Number, {"precision": 0}, section=section))


def _diagnostic_routes() -> tuple:
    """The soak test's and the benchmark's probes, only with AUTOLORA_DIAGNOSTICS=1."""
    from lib_autolora import diagnostics
    if not diagnostics.enabled():
        return ()
    stats.BOARD.gc_clock = diagnostics.GcClock().install()
    return tuple(diagnostics.routes(lambda: diagnostics.host_residue(
        script_callbacks.callback_map, shared.sd_model, stats.BOARD.open_runs())))


def on_app_started(_demo, app):
    http.install(app, stats=stats.BOARD.snapshot, params_table=params.table_json,
                 unavailable=None if ADAPTER.available else ADAPTER.reason, extra_routes=_diagnostic_routes())


script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
# The X/Y/Z axes are added now (the built-in X/Y/Z script loads before extensions), so that they
# exist before the API builds its script args; on_before_ui is the fallback for other load orders.
if not xyz.register():
    script_callbacks.on_before_ui(xyz.register)
