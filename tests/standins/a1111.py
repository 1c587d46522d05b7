"""Stand-ins for the parts of AUTOMATIC1111 v1.10.1 the extension touches, for the hermetic suite.

Every class and function here is named StandIn*/standin_* and copies the real signature and call
order of the A1111 code it replaces (file and function named in each docstring), reduced to what
the extension sees. No A1111 code is imported; the real thing is exercised by tests/e2e.
"""
from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from types import SimpleNamespace

import torch


# -- modules/prompt_parser.py ----------------------------------------------------------------------

class StandInMulticond:
    """MulticondLearnedConditioning without schedules: batch[i] = [(cond tensor (T, D), weight), ...]."""

    def __init__(self, batch):
        self.batch = batch
        self.shape = (len(batch),)


def standin_stack_conds(tensors):
    """prompt_parser.stack_conds: pad shorter conds by repeating their last vector."""
    token_count = max(x.shape[0] for x in tensors)
    out = []
    for t in tensors:
        if t.shape[0] != token_count:
            t = torch.vstack([t, t[-1:].repeat([token_count - t.shape[0], 1])])
        out.append(t)
    return torch.stack(out)


def standin_reconstruct_multicond_batch(c: StandInMulticond, current_step):
    """prompt_parser.reconstruct_multicond_batch -> (conds_list, stacked tensor)."""
    tensors, conds_list = [], []
    for composable in c.batch:
        conds_for_batch = []
        for cond, weight in composable:
            conds_for_batch.append((len(tensors), weight))
            tensors.append(cond)
        conds_list.append(conds_for_batch)
    return conds_list, standin_stack_conds(tensors)


def standin_reconstruct_cond_batch(c, current_step):
    """prompt_parser.reconstruct_cond_batch: one (T, D) cond per image (no schedules here)."""
    return torch.stack(list(c))


# -- modules/sd_samplers_cfg_denoiser.py -----------------------------------------------------------

def standin_catenate_conds(conds):
    if not isinstance(conds[0], dict):
        return torch.cat(conds)
    return {key: torch.cat([x[key] for x in conds]) for key in conds[0].keys()}


def standin_subscript_cond(cond, a, b):
    if not isinstance(cond, dict):
        return cond[a:b]
    return {key: vec[a:b] for key, vec in cond.items()}


def standin_pad_cond(tensor, repeats, empty):
    if not isinstance(tensor, dict):
        return torch.cat([tensor, empty.repeat((tensor.shape[0], repeats, 1))], axis=1)
    tensor['crossattn'] = standin_pad_cond(tensor['crossattn'], repeats, empty)
    return tensor


class StandInCFGDenoiserParams:
    """script_callbacks.CFGDenoiserParams(x, image_cond, sigma, sampling_step, total_sampling_steps,
    text_cond, text_uncond, denoiser)."""

    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


class StandInCFGDenoisedParams:
    """script_callbacks.CFGDenoisedParams(x, sampling_step, total_sampling_steps, inner_model)."""

    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x, self.sampling_step, self.total_sampling_steps = x, sampling_step, total_sampling_steps
        self.inner_model = inner_model


class StandInModelWrap(torch.nn.Module):
    """k-diffusion's CompVisDenoiser as A1111 calls it: model_wrap(x, sigma, cond={"c_crossattn": [ctx],
    "c_concat": [image_cond]}), here over the tiny model's denoiser."""

    def __init__(self, denoiser):
        super().__init__()
        self.inner = denoiser
        self.sigmas = torch.linspace(0.03, 14.6, 10)
        self.calls = []  # rows per call, to check the layouts really differ

    def forward(self, x, sigma, cond=None):
        self.calls.append(x.shape[0])
        return self.inner(x, sigma, cond["c_crossattn"][0])


class StandInCFGDenoiser(torch.nn.Module):
    """sd_samplers_cfg_denoiser.CFGDenoiser (v1.10.1) for SD1.x conds: forward() keeps the real
    order: reconstruct conds -> x_in -> cfg_denoiser_callback -> skip uncond (skip early CFG / NGMS)
    -> pad cond/uncond -> model calls (batched, chunked, or unequal lengths) -> fake uncond ->
    cfg_denoised_callback -> combine_denoised -> step += 1. Mask blending and previews are left out."""

    def __init__(self, sampler, p, model_factory, shared, callbacks):
        super().__init__()
        self.model_wrap = None
        self.sampler, self.p = sampler, p
        self.step, self.steps, self.total_steps = 0, None, None
        self.padded_cond_uncond = False
        self.padded_cond_uncond_v0 = False
        self.cond_scale_miltiplier = 1.0
        self.need_last_noise_uncond = False  # set by DDIM CFG++ (sd_samplers_timesteps_impl.ddim_cfgpp)
        self.last_noise_uncond = None
        self._model_factory, self._shared, self._callbacks = model_factory, shared, callbacks

    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = self._model_factory()
        return self.model_wrap

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0]:]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def pad_cond_uncond(self, cond, uncond):
        empty = self._shared.sd_model.cond_stage_model_empty_prompt
        num_repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
        if num_repeats < 0:
            cond = standin_pad_cond(cond, -num_repeats, empty)
            self.padded_cond_uncond = True
        elif num_repeats > 0:
            uncond = standin_pad_cond(uncond, num_repeats, empty)
            self.padded_cond_uncond = True
        return cond, uncond

    def pad_cond_uncond_v0(self, cond, uncond):
        uncond_vec = uncond
        if uncond_vec.shape[1] < cond.shape[1]:
            last_vector = uncond_vec[:, -1:]
            uncond_vec = torch.hstack([uncond_vec, last_vector.repeat([1, cond.shape[1] - uncond_vec.shape[1], 1])])
            self.padded_cond_uncond_v0 = True
        elif uncond_vec.shape[1] > cond.shape[1]:
            uncond_vec = uncond_vec[:, :cond.shape[1]]
            self.padded_cond_uncond_v0 = True
        return cond, uncond_vec

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        opts = self._shared.opts
        pp = self._shared.prompt_parser
        conds_list, tensor = pp.reconstruct_multicond_batch(cond, self.step)
        uncond = pp.reconstruct_cond_batch(uncond, self.step)
        batch_size = len(conds_list)
        repeats = [len(conds_list[i]) for i in range(batch_size)]
        image_uncond = image_cond
        make_condition_dict = lambda c_crossattn, c_concat: {"c_crossattn": [c_crossattn], "c_concat": [c_concat]}  # noqa: E731
        x_in = torch.cat([torch.stack([x[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([torch.stack([sigma[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [sigma])
        image_cond_in = torch.cat([torch.stack([image_cond[i] for _ in range(n)]) for i, n in enumerate(repeats)]
                                  + [image_uncond])

        denoiser_params = StandInCFGDenoiserParams(x_in, image_cond_in, sigma_in, self.step, self.total_steps, tensor,
                                                   uncond, self)
        self._callbacks.cfg_denoiser_callback(denoiser_params)
        x_in, image_cond_in, sigma_in = denoiser_params.x, denoiser_params.image_cond, denoiser_params.sigma
        tensor, uncond = denoiser_params.text_cond, denoiser_params.text_uncond
        skip_uncond = False
        if opts.skip_early_cond != 0. and self.step / self.total_steps <= opts.skip_early_cond:
            skip_uncond = True
        elif (self.step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            skip_uncond = True
        if skip_uncond:
            x_in = x_in[:-batch_size]
            sigma_in = sigma_in[:-batch_size]

        self.padded_cond_uncond = False
        self.padded_cond_uncond_v0 = False
        if opts.pad_cond_uncond_v0 and tensor.shape[1] != uncond.shape[1]:
            tensor, uncond = self.pad_cond_uncond_v0(tensor, uncond)
        elif opts.pad_cond_uncond and tensor.shape[1] != uncond.shape[1]:
            tensor, uncond = self.pad_cond_uncond(tensor, uncond)

        if tensor.shape[1] == uncond.shape[1] or skip_uncond:
            cond_in = tensor if skip_uncond else standin_catenate_conds([tensor, uncond])
            if opts.batch_cond_uncond:
                x_out = self.inner_model(x_in, sigma_in, cond=make_condition_dict(cond_in, image_cond_in))
            else:
                x_out = torch.zeros_like(x_in)
                for batch_offset in range(0, x_out.shape[0], batch_size):
                    a, b = batch_offset, batch_offset + batch_size
                    x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b], cond=make_condition_dict(
                        standin_subscript_cond(cond_in, a, b), image_cond_in[a:b]))
        else:
            x_out = torch.zeros_like(x_in)
            batch_size = batch_size * 2 if opts.batch_cond_uncond else batch_size
            for batch_offset in range(0, tensor.shape[0], batch_size):
                a, b = batch_offset, min(batch_offset + batch_size, tensor.shape[0])
                x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b], cond=make_condition_dict(
                    standin_subscript_cond(tensor, a, b), image_cond_in[a:b]))
            if not skip_uncond:
                x_out[-uncond.shape[0]:] = self.inner_model(x_in[-uncond.shape[0]:], sigma_in[-uncond.shape[0]:],
                                                            cond=make_condition_dict(uncond,
                                                                                     image_cond_in[-uncond.shape[0]:]))

        denoised_image_indexes = [x[0][0] for x in conds_list]
        if skip_uncond:
            fake_uncond = torch.cat([x_out[i:i + 1] for i in denoised_image_indexes])
            x_out = torch.cat([x_out, fake_uncond])

        self._callbacks.cfg_denoised_callback(StandInCFGDenoisedParams(x_out, self.step, self.total_steps, self.inner_model))
        if self.need_last_noise_uncond:
            self.last_noise_uncond = torch.clone(x_out[-uncond.shape[0]:])
        if skip_uncond:
            denoised = self.combine_denoised(x_out, conds_list, uncond, 1.0)
        else:
            denoised = self.combine_denoised(x_out, conds_list, uncond, cond_scale * self.cond_scale_miltiplier)
        self.step += 1
        return denoised


# -- modules/script_callbacks.py, modules/scripts.py, modules/shared.py, gradio --------------------

class StandInCallbacks:
    """script_callbacks: on_*(callback, *, name=None) registers; *_callback(params) calls in order."""

    KINDS = ("cfg_denoiser", "cfg_denoised", "cfg_after_cfg", "ui_settings", "app_started", "before_ui")

    def __init__(self):
        self.lists = {kind: [] for kind in self.KINDS}

    def _on(self, kind):
        def register(callback, *, name=None):
            self.lists.setdefault(kind, []).append(callback)
        return register

    def __getattr__(self, name):
        if name.startswith("on_"):
            return self._on(name[3:])
        raise AttributeError(name)

    @property
    def callback_map(self) -> dict:
        """{"callbacks_<kind>": [registered entries]} as the real module keeps them."""
        return {f"callbacks_{kind}": entries for kind, entries in self.lists.items()}

    def cfg_denoiser_callback(self, params):
        for cb in self.lists.get("cfg_denoiser", []):
            cb(params)

    def cfg_denoised_callback(self, params):
        for cb in self.lists.get("cfg_denoised", []):
            cb(params)


class StandInOptions(SimpleNamespace):
    def add_option(self, key, info):
        setattr(self, key, info.default)


class StandInOptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None, **kw):
        self.default, self.label, self.component_args, self.section = default, label, component_args, section

    def info(self, text):
        return self


def standin_opts(**kw):
    values = dict(batch_cond_uncond=True, pad_cond_uncond=False, pad_cond_uncond_v0=False, skip_early_cond=0.0,
                  s_min_uncond_all=False, lora_functional=False, use_old_scheduling=False)
    values.update(kw)
    return StandInOptions(**values)


class StandInComponent:
    """A gradio 3.41 component: value, label, elem_id, and min/max/step/choices where it has them.
    `created` lists every component made, for the tests to find the ones a script builds."""

    created: list = []

    def __init__(self, value=None, label=None, elem_id=None, **kw):
        self.value, self.label, self.elem_id = value, label, elem_id
        for k, v in kw.items():
            setattr(self, k, v)
        StandInComponent.created.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    # events: what a block's listener gets wired to (fn, inputs, outputs), per event
    def click(self, fn, inputs=None, outputs=None, **kw):
        self.listeners = getattr(self, "listeners", {}) | {"click": (fn, inputs, outputs)}

    def change(self, fn, inputs=None, outputs=None, **kw):
        self.listeners = getattr(self, "listeners", {}) | {"change": (fn, inputs, outputs)}


def standin_gradio():
    gr = types.ModuleType("gradio")
    for name in ("Slider", "Checkbox", "Dropdown", "Textbox", "Number", "Row", "Column", "Accordion", "Group", "HTML",
                 "Button"):
        setattr(gr, name, type(name, (StandInComponent,), {}))
    gr.update = lambda **kw: dict(kw, __type__="update")
    return gr


class StandInInputAccordion(StandInComponent):
    """ui_components.InputAccordion(value, **kwargs): a checkbox whose value is the accordion's state."""

    def __init__(self, value, **kwargs):
        super().__init__(value, **kwargs)


class StandInToolButton(StandInComponent):
    """ui_components.ToolButton(*args, **kwargs): a gr.Button with the "tool" class."""


class StandInScript:
    """modules.scripts.Script: the attributes the script runner sets and reads, and
    `on_after_component(callback, *, elem_id)`: the runner calls `callback(OnComponent(component))`
    when the component with that elem_id has been built (the prompt box: before the scripts' UI)."""

    filename = None
    args_from = args_to = None
    alwayson = False
    is_txt2img = is_img2img = False
    infotext_fields = None
    paste_field_names = None
    on_after_component_elem_id = None

    def on_after_component(self, callback, *, elem_id):
        if self.on_after_component_elem_id is None:
            self.on_after_component_elem_id = []
        self.on_after_component_elem_id.append((elem_id, callback))


@contextmanager
def installed(opts=None, sd_model=None):
    """Put stand-in `modules.*` and `gradio` into sys.modules for the duration of a test."""
    callbacks = StandInCallbacks()
    shared = types.ModuleType("modules.shared")
    shared.opts = opts or standin_opts()
    shared.sd_model = sd_model or SimpleNamespace(sd_checkpoint_info=SimpleNamespace(filename="standin.safetensors",
                                                                                   title="standin"))
    shared.OptionInfo = StandInOptionInfo
    prompt_parser = types.ModuleType("modules.prompt_parser")
    prompt_parser.reconstruct_multicond_batch = standin_reconstruct_multicond_batch
    prompt_parser.reconstruct_cond_batch = standin_reconstruct_cond_batch
    shared.prompt_parser = prompt_parser
    scripts = types.ModuleType("modules.scripts")
    scripts.Script = StandInScript
    scripts.AlwaysVisible = object()
    scripts.scripts_data = []
    ui_components = types.ModuleType("modules.ui_components")
    ui_components.InputAccordion = StandInInputAccordion
    ui_components.ToolButton = StandInToolButton
    script_callbacks = types.ModuleType("modules.script_callbacks")
    for kind in ("cfg_denoiser", "cfg_denoised", "ui_settings", "app_started", "before_ui"):
        setattr(script_callbacks, f"on_{kind}", getattr(callbacks, f"on_{kind}"))
    script_callbacks.callback_map = callbacks.callback_map
    devices = types.ModuleType("modules.devices")
    devices.autocast = contextmanager(lambda: (yield))
    cfg_denoiser = types.ModuleType("modules.sd_samplers_cfg_denoiser")
    cfg_denoiser.CFGDenoiser = StandInCFGDenoiser
    sd_samplers = types.ModuleType("modules.sd_samplers")
    sd_samplers.find_sampler_config = lambda name: None
    modules = types.ModuleType("modules")
    modules.__path__ = []
    fakes = {"modules": modules, "modules.shared": shared, "modules.prompt_parser": prompt_parser,
             "modules.scripts": scripts, "modules.ui_components": ui_components,
             "modules.script_callbacks": script_callbacks, "modules.devices": devices,
             "modules.sd_samplers": sd_samplers, "modules.sd_samplers_cfg_denoiser": cfg_denoiser,
             "gradio": standin_gradio()}
    for name, module in fakes.items():
        if name != "modules":
            setattr(modules, name.split(".")[-1], module)
    saved = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    try:
        yield SimpleNamespace(shared=shared, callbacks=callbacks, scripts=scripts, modules=fakes)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
