"""The WebUI glue shared by the hosts, hermetic: the LoRAs a prompt names, settings with X/Y/Z
overrides, and the AlwaysOn script (UI, infotext and paste derived from the parameter table, its
call order, the infotext written only for guided batches), with the stand-ins of
tests/standins/a1111.py. The API check and routes: test_api.py; the adapters: test_a1111_adapter.py
and test_forge_adapter.py; the real WebUIs: tests/e2e.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import sys
from types import SimpleNamespace

import pytest

from standins import a1111 as sti
from helpers import settings_from_infotext
from lib_autolora import params, prompts, stats
from lib_autolora.generation import Generation
from lib_autolora.hosts import xyz
from lib_autolora.hosts.adapter import Adapter
from lib_autolora.params import AutoLoraArgumentError, AutoLoraSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- prompts and API validation ---------------------------------------------------------------------

def test_lora_tags_in_prompts():
    assert prompts.lora_names_in_prompt("a <lora:style_a:0.8> b <LORA:Other:te=1:unet=0.5>", ["<lora:x>", None],
                                       "<lyco:y:1> <lora:style_a>") == ["style_a", "Other", "x", "y"]


def test_select_guided_by_any_name_and_clear_error():
    loaded = [("k1", "style", "style", "style_file", "Style Alias"), ("k2", "other", None, "other", "other")]
    assert prompts.select_guided(loaded, ()) == ["k1", "k2"]
    assert prompts.select_guided(loaded, ("style alias",)) == ["k1"]
    with pytest.raises(AutoLoraArgumentError, match="'nope' not in the prompt; the prompt's LoRAs: style, other"):
        prompts.select_guided(loaded, ("nope",))


# -- settings, X/Y/Z --------------------------------------------------------------------------------

class StandInAxisOption:
    """scripts/xyz_grid.py AxisOption(label, type, apply, format_value=..., confirm=None, cost=0.0,
    choices=None, prepare=None)."""

    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.confirm, self.choices = label, type, apply, confirm, choices


def standin_xyz_module():
    """A1111's scripts/xyz_grid.py as AutoLoRA uses it. Forge Classic's script (extensions-builtin/xyz)
    has the same AxisOption and axis_options but keeps boolean_choice in lib_xyz.utils: not here,
    so the axes must not need it."""
    return SimpleNamespace(AxisOption=StandInAxisOption, axis_options=[StandInAxisOption("Nothing", str, None)])


def _xyz_script_data(module):
    # modules/scripts.py ScriptClassData(script_class, path, basedir, module); the X/Y/Z script's class
    # lives in the module named "xyz_grid.py" (A1111) or loaded from extensions-builtin/xyz (Forge Classic).
    script_class = type("Script", (), {"__module__": "xyz_grid.py"})
    return SimpleNamespace(script_class=script_class, path="xyz_grid.py", basedir="", module=module)


def test_register_adds_the_axes_to_the_loaded_xyz_script_and_survives_one_it_cannot_use(capsys):
    class AxisOptionOfAnotherShape:  # a host whose AxisOption takes other arguments
        def __init__(self, label, type, apply, **kw):
            raise TypeError(f"unexpected keyword {sorted(kw)[0]!r}")

    with sti.installed():
        from modules import scripts
        assert xyz.register() is False  # not loaded yet: on_before_ui tries again
        grid = standin_xyz_module()
        scripts.scripts_data.append(_xyz_script_data(grid))
        assert xyz.register() is True and len(grid.axis_options) == 1 + len(params.XYZ_PARAMS)
        other = SimpleNamespace(AxisOption=AxisOptionOfAnotherShape, axis_options=[])
        scripts.scripts_data[:] = [_xyz_script_data(other)]
        assert xyz.register() is True and other.axis_options == []
    assert "AutoLoRA: no X/Y/Z axes on this WebUI (TypeError: unexpected keyword 'choices')" in capsys.readouterr().out


def test_xyz_axes_from_the_table_and_cells_independent():
    grid = standin_xyz_module()
    assert xyz.add_axes(grid) == len(params.XYZ_PARAMS)
    assert xyz.add_axes(grid) == 0  # idempotent (import time and on_before_ui)
    labels = [o.label for o in grid.axis_options]
    assert "[AutoLoRA] γ (AutoLoRA scale)" in labels and "[AutoLoRA] Enabled" in labels
    gamma = next(o for o in grid.axis_options if o.label == "[AutoLoRA] γ (AutoLoRA scale)")
    # What xyz_grid.run does: type() each value, confirm the list, apply each to a copy of p.
    xs = [gamma.type(v) for v in ("1", "2.5")]
    gamma.confirm(None, xs)
    p = SimpleNamespace()
    cells = []
    for x in xs:
        pc = copy.copy(p)
        gamma.apply(pc, x, xs)
        cells.append(xyz.settings_for(pc, [True]))
    assert [c.gamma for c in cells] == [1.0, 2.5] and not hasattr(p, xyz.OVERRIDES_ATTR)
    enabled = next(o for o in grid.axis_options if o.label == "[AutoLoRA] Enabled")
    assert enabled.choices() == ["False", "True"]
    pc = copy.copy(p)
    enabled.apply(pc, "True", ["True"])
    assert xyz.settings_for(pc, [False]).enabled
    start = next(o for o in grid.axis_options if o.label == "[AutoLoRA] Guidance start")
    with pytest.raises(AutoLoraArgumentError, match="'start' must be between 0 and 1, got 1.5"):
        start.confirm(None, [0.2, 1.5])
    pc = copy.copy(p)
    start.apply(pc, 0.9, [0.9])
    with pytest.raises(AutoLoraArgumentError, match="must not exceed"):
        xyz.settings_for(pc, [True, 1.5, -1, -1, 1, 0, 0.5])
    # choice-valued parameters are axes with their choices; a bad cell is refused before the grid runs
    strategy = next(o for o in grid.axis_options if o.label == "[AutoLoRA] Base-branch strategy")
    assert strategy.choices() == list(params.STRATEGY_CHOICES)
    with pytest.raises(AutoLoraArgumentError, match="'strategy' must be one of"):
        strategy.confirm(None, ["swap", "fastest"])
    pc = copy.copy(p)
    strategy.apply(pc, "swap", ["swap"])
    assert xyz.settings_for(pc, [True]).strategy == "swap"
    assert {params.xyz_label(p) for p in params.PARAMS if p.name != "guided_loras"} <= {o.label for o in grid.axis_options}


# -- the AlwaysOn script ----------------------------------------------------------------------------

def _load_script():
    spec = importlib.util.spec_from_file_location("autolora_script_under_test", os.path.join(ROOT, "scripts", "autolora.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_ui_follows_the_table_and_paste_restores_every_control():
    with sti.installed() as host:
        script_module = _load_script()
        script = script_module.AutoLoraScript()
        assert script.title() == "AutoLoRA" and script.show(False) is host.scripts.AlwaysVisible
        controls = script.ui(False)
        assert [c.elem_id for c in controls] == [f"autolora_txt2img_{n}" for n in params.ARG_ORDER] + [
            f"autolora_txt2img_{p.name}_unset" for p in params.UNSET_BOXES]
        assert isinstance(controls[0], sti.StandInInputAccordion) and controls[0].value is False
        assert [c.label for c in controls] == [p.label for p in params.PARAMS] + [
            p.unset_label for p in params.UNSET_BOXES]
        gamma, w1 = controls[1], controls[2]
        assert (gamma.minimum, gamma.maximum, gamma.value) == (-2.0, 5.0, 1.5) and isinstance(gamma.value, float)
        assert (w1.minimum, w1.maximum, w1.value) == (0.0, 30.0, 7.0), "the slider spans the valid range only"
        # The defaults the API fills in (init_default_script_args reads each control's value) parse to off.
        assert params.settings_from_args([c.value for c in controls]) == AutoLoraSettings()
        # Infotext of an enabled run -> the paste functions -> the same settings.
        s = AutoLoraSettings(True, 1.2, 5.0, None, 0.8, 0.25, 0.75, ("style",), "sequential", False, hr_gamma=-1.0)
        infotext = params.infotext_fields(s)
        pasted = [fn(infotext) for _, fn in script.infotext_fields]
        assert params.settings_from_args(pasted) == s, "hires γ -1 is a number in the UI and the infotext"
        assert script.paste_field_names == [p.infotext for p in params.PARAMS]
        assert [c.elem_id for c in script.ui(True)][0] == "autolora_img2img_enabled"
        # Settings page and callbacks registered at import time
        script_module.on_ui_settings()
        assert host.shared.opts.autolora_default_strategy == "auto" and host.shared.opts.autolora_swap_budget_mb == 0
        assert script_module.on_app_started in host.callbacks.lists["app_started"]
        assert host.callbacks.lists["cfg_denoiser"] and host.callbacks.lists["cfg_denoised"]


class StandInAdapter:
    """The HostAdapter protocol (lib_autolora/hosts/__init__.py), recording its calls; `guided`
    steps are counted on its Generation when sampling starts, as the real adapters do per step."""

    def __init__(self, notice=None, error=None, guided=1):
        self.calls, self.notice, self.error, self.guided, self.gens = [], notice, error, guided, {}

    def start_batch(self, p, settings):
        self.calls.append(("start_batch", settings))
        if self.error:
            raise self.error
        gen = self.gens.setdefault(id(p), Generation(settings, "standin"))
        gen.begin_batch()
        return self.notice

    def before_sampling(self, p, **kw):
        self.calls.append(("before_sampling", sorted(kw)))
        self.gens[id(p)].stats.guided_steps += self.guided

    def generation(self, p):
        return self.gens.get(id(p))

    def finish(self, p):
        self.calls.append(("finish",))
        self.gens.pop(id(p), None)

    def suspend(self):
        self.calls.append(("suspend",))


def _p(**kw):
    comments = []
    return SimpleNamespace(comments=comments, comment=comments.append, extra_generation_params={}, **kw)


def _generate(script, p, *args, batches=1):
    """processing.process_images_inner's order: process -> per batch (process_batch ->
    process_before_every_sampling -> sampling -> postprocess_batch -> the batch's infotexts) -> postprocess."""
    script.process(p, *args)
    infotexts = []
    for n in range(batches):
        script.process_batch(p, *args, batch_number=n, prompts=["x"], seeds=[1], subseeds=[1])
        script.process_before_every_sampling(p, *args, x=1, noise=2, c=3, uc=4)
        script.postprocess_batch(p, *args, images=[], batch_number=n)
        infotexts.append(dict(p.extra_generation_params))
    script.postprocess(p, None, *args)
    return infotexts


def test_script_call_order_and_bad_ui_values():
    with sti.installed():
        module = _load_script()
        script = module.AutoLoraScript()
        module.ADAPTER = adapter = StandInAdapter(notice="AutoLoRA: note")
        p = _p()
        _generate(script, p, True, 2.0)
        assert [c[0] for c in adapter.calls] == ["finish", "start_batch", "before_sampling", "finish"]
        assert adapter.calls[1][1].gamma == 2.0 and adapter.calls[2][1] == ["c", "noise", "uc", "x"]
        assert p.comments == ["AutoLoRA: note"]
        # disabled: the adapter is never asked to start
        adapter.calls.clear()
        q = _p()
        _generate(script, q, False, 2.0)
        assert [c[0] for c in adapter.calls] == ["finish", "finish"] and not q.extra_generation_params
        # invalid UI values: logged, a notice, AutoLoRA off
        r = _p()
        _generate(script, r, True, float("nan"))
        assert "must be finite" in r.comments[0] and not any(c[0] == "start_batch" for c in adapter.calls[2:])
        # an adapter error: notice, AutoLoRA off, infotext cleaned
        module.ADAPTER = StandInAdapter(error=AutoLoraArgumentError("AutoLoRA: guided LoRA(s) 'x' not in the prompt"))
        s = _p()
        script.process(s, True)
        s.extra_generation_params["AutoLoRA gamma"] = "1.5"
        script.process_batch(s, True)
        assert "not in the prompt" in s.comments[0] and "AutoLoRA gamma" not in s.extra_generation_params


def test_infotext_claims_autolora_only_for_batches_with_a_guided_step():
    with sti.installed():
        module = _load_script()
        script = module.AutoLoraScript()
        module.ADAPTER = StandInAdapter(guided=2)
        p = _p()
        (info,) = _generate(script, p, True, 1.25)
        assert info["AutoLoRA"] == "True" and info["AutoLoRA gamma"] == "1.25" and not p.comments
        assert settings_from_infotext(info) == AutoLoraSettings(enabled=True, gamma=1.25)
        # set up, but no step guided (every step fell back, an interval with no step): no claim, a notice
        module.ADAPTER = StandInAdapter(guided=0)
        q = _p()
        (info,) = _generate(script, q, True, 1.25)
        assert not any(key.startswith("AutoLoRA") for key in info)
        assert q.comments == ["AutoLoRA: no step of this batch was guided; generated without AutoLoRA"]
        # batch count 2, each batch judged on its own steps
        adapter = module.ADAPTER = StandInAdapter(guided=1)
        r = _p()
        script.process(r, True)
        script.process_batch(r, True)
        script.process_before_every_sampling(r, True, c=1, uc=2)
        script.postprocess_batch(r, True)
        assert r.extra_generation_params["AutoLoRA"] == "True" and "AutoLoRA version" in r.extra_generation_params
        adapter.guided = 0
        script.process_batch(r, True)
        script.process_before_every_sampling(r, True, c=1, uc=2)
        script.postprocess_batch(r, True)
        assert not any(key.startswith("AutoLoRA") for key in r.extra_generation_params)


def test_script_carries_the_tooltips_in_the_page_and_installs_the_routes_at_app_start():
    with sti.installed() as host:
        module = _load_script()
        script = module.AutoLoraScript()
        script.ui(False)
        html = [c for c in sti.StandInComponent.created if type(c).__name__ == "HTML"][-1].value
        assert 'id="autolora_txt2img_tooltips"' in html and "data-tooltips=" in html
        import html as html_lib
        import json
        data = json.loads(html_lib.unescape(html.split('data-tooltips="')[1].split('"')[0]))
        assert data == {p.name: p.tooltip for p in params.PARAMS} | {
            f"{p.name}_unset": p.tooltip for p in params.UNSET_BOXES}, "the unset boxes explain their slider"
        assert module.on_app_started in host.callbacks.lists["app_started"]


def test_diagnostic_routes_and_the_gc_clock_exist_only_with_the_variable(monkeypatch):
    import gc

    from lib_autolora import stats
    with sti.installed():
        module = _load_script()
        monkeypatch.delenv("AUTOLORA_DIAGNOSTICS", raising=False)
        assert module._diagnostic_routes() == () and stats.BOARD.gc_clock is None
        monkeypatch.setenv("AUTOLORA_DIAGNOSTICS", "1")
        try:
            routes = module._diagnostic_routes()
            assert [(path, method) for path, _, method in routes] == [
                ("/autolora/v1/residue", "GET"), ("/autolora/v1/reset-peak", "POST")]
            assert stats.BOARD.gc_clock in gc.callbacks
            assert routes[0][1]()["open_runs"] == stats.BOARD.open_runs()
        finally:
            if stats.BOARD.gc_clock in gc.callbacks:
                gc.callbacks.remove(stats.BOARD.gc_clock)
            stats.BOARD.gc_clock = None


def test_the_line_under_the_images_says_what_ran_and_the_infotext_names_the_strategy_that_ran():
    with sti.installed():
        module = _load_script()
        script = module.AutoLoraScript()
        adapter = module.ADAPTER = StandInAdapter(guided=3)
        p, processed = _p(), SimpleNamespace(comments="an earlier comment\n")
        script.process(p, True)
        script.process_batch(p, True)
        gen = adapter.generation(p)
        gen.stats.active, gen.stats.plain_steps, gen.stats.strategy = True, 1, "batched"  # what `auto` chose
        script.process_before_every_sampling(p, True, c=1, uc=2)
        script.postprocess_batch(p, True)
        script.postprocess(p, processed, True)
    assert p.extra_generation_params["AutoLoRA strategy"] == "batched (auto)", "what ran, and that auto picked it"
    strategy = params.BY_NAME["strategy"]
    assert params.paste_value(strategy, p.extra_generation_params) == "auto", "pasting restores the user's choice"
    assert processed.comments.startswith("an earlier comment\nAutoLoRA: 3 of 4 steps guided, base branch 'batched', ")
    assert processed.comments.endswith(" s for the whole generation\n")


def test_the_users_defaults_from_the_settings_page_open_the_ui():
    with sti.installed(sti.standin_opts(autolora_enabled_by_default=True, autolora_default_gamma=2.0)):
        module = _load_script()
        controls = module.AutoLoraScript().ui(False)
        assert params.settings_from_args([c.value for c in controls]) == AutoLoraSettings(enabled=True, gamma=2.0)
    with sti.installed():
        module = _load_script()
        module.on_ui_settings()
        opts = sys.modules["modules.shared"].opts
        assert opts.autolora_enabled_by_default is False and opts.autolora_default_gamma == 1.5


def _built(_kind, elem):
    return next(c for c in reversed(sti.StandInComponent.created) if getattr(c, "elem_id", None) == elem)


def test_the_guided_loras_can_be_picked_from_the_prompt():
    with sti.installed():
        module = _load_script()
        script = module.AutoLoraScript()
        prompt = sti.StandInComponent("", elem_id="txt2img_prompt")
        for elem, callback in script.on_after_component_elem_id:  # what the runner does as it builds the page
            if elem == "txt2img_prompt":
                callback(SimpleNamespace(component=prompt))
        controls = script.ui(False)
        refresh = _built("Button", "autolora_txt2img_guided_refresh")
        pick = _built("Dropdown", "autolora_txt2img_guided_pick")
        fn, inputs, outputs = refresh.listeners["click"]
        assert inputs == [prompt] and outputs == [pick]
        assert fn("a cat <lora:style_a:0.8> AND a dog <lora:style b:1>")["choices"] == ["style_a", "style b"]
        fn, inputs, outputs = pick.listeners["change"]
        textbox = controls[params.ARG_ORDER.index("guided_loras")]
        assert outputs == [textbox] and fn(["style b", "style_a"]) == "style b, style_a"
        assert params.coerce(params.BY_NAME["guided_loras"], fn(["style b", "style_a"])) == ("style b", "style_a")
        # a WebUI whose prompt box the runner did not hand over: no picker, the textbox alone
        other = module.AutoLoraScript()
        sti.StandInComponent.created.clear()
        other.ui(True)
        assert not any(getattr(c, "elem_id", "") == "autolora_img2img_guided_pick" for c in sti.StandInComponent.created)


def test_a_preset_sets_its_controls_and_nothing_else():
    with sti.installed():
        module = _load_script()
        controls = dict(zip(params.ARG_ORDER, module.AutoLoraScript().ui(False)))
        preset = _built("Dropdown", "autolora_txt2img_preset")
        fn, inputs, outputs = preset.listeners["change"]
        assert inputs == [preset] and outputs == [controls["gamma"], controls["schedule"]]
        assert set(preset.choices) == set(params.PRESETS) and all(why in preset.info for _, why in params.PRESETS.values())
        for label, (values, _why) in params.PRESETS.items():
            updates = fn(label)
            assert [u["value"] for u in updates] == [values["gamma"], values["schedule"]]
            for name, value in values.items():  # each preset's values are valid settings
                params.coerce(params.BY_NAME[name], value)
        assert fn(None) == [{"__type__": "update"}] * 2, "clearing the preset changes nothing"


def _image(script, outer, detailer_pass, ours_first: bool) -> dict:
    """processing's image loop for the image at (outer.iteration, outer.batch_index): every script's
    postprocess_image (ADetailer's runs the detailer pass, `detailer_pass()`; which of the two
    scripts comes first depends on the extensions' order), then the image's infotext params."""
    pp = SimpleNamespace(image=None)
    if ours_first:
        script.postprocess_image(outer, pp, True, 1.5)
    # ADetailer's postprocess_image: every script's postprocess on a copy of the job at the batch's
    # first image, the pass, every script's process on a copy at its last (to set up the next batch)
    if outer.batch_index == 0:
        script.postprocess(copy.copy(outer), SimpleNamespace(comments=""), True, 1.5)
    detailer_pass()
    if outer.batch_index == outer.batch_size - 1:
        script.process(copy.copy(outer), True, 1.5)
    if not ours_first:
        script.postprocess_image(outer, pp, True, 1.5)
    return {k: v for k, v in outer.extra_generation_params.items() if v is not None}


class OneHost(Adapter):
    """The real adapter lifecycle (one generation holds the host at a time; a nested one makes the
    running one wait), with a host whose every pass guides `steps` steps."""

    name = "lifecycle stand-in"

    def __init__(self, steps=3):
        super().__init__()
        self.steps = steps

    def loaded_loras(self):
        return [("style.safetensors", "style")]

    def open_batch(self, p, gen):
        return None

    def bind_pass(self, p, gen, c, uc):
        gen.stats.guided_steps += self.steps

    def close(self, gen, p):
        return None


def _job(**kw):
    return _p(batch_size=1, cfg_scale=7.0, is_hr_pass=False, **kw)


@pytest.mark.parametrize("ours_first", [True, False])
def test_a_detailer_pass_between_batches_keeps_the_line_under_the_images_whole(ours_first):
    """The detailer pass is a generation of its own, nested in the job's: the job's generation
    waits through it and goes on with its next batch, so the line under the job's images counts
    every guided step of the job's own batches, and only those."""
    with sti.installed():
        module = _load_script()
        script = module.AutoLoraScript()
        module.ADAPTER = OneHost(steps=3)
        outer = _job()
        script.process(outer, True, 1.5)
        records = []
        for outer.iteration in range(2):
            script.process_batch(outer, True, 1.5)
            records.append(module.ADAPTER.generation(outer).stats)
            script.process_before_every_sampling(outer, True, 1.5, c=1, uc=2)
            script.postprocess_batch(outer, True, 1.5)
            outer.batch_index = 0
            info = _image(script, outer, lambda: _generate(script, _job(_ad_inner=True), True, 1.5), ours_first)
            assert info[module.DETAILER_KEY] == "guided"
        assert records[0] is records[1], "the job is one AutoLoRA generation"
        processed = SimpleNamespace(comments="")
        script.postprocess(outer, processed, True, 1.5)
        assert processed.comments.startswith("AutoLoRA: 6 of 6 steps guided, base branch 'none', "), processed.comments
        assert records[0].finished and stats.BOARD.open_runs() == 0


def test_a_job_that_fails_after_its_detailer_pass_marks_its_own_record():
    """The job's next batch raises (its prompt lost the guided LoRA): the job's record says AutoLoRA
    stopped, the detailer pass's record (the last one begun) is left as it was."""
    with sti.installed():
        module = _load_script()
        script = module.AutoLoraScript()
        module.ADAPTER = host = OneHost(steps=3)
        outer = _job(iteration=0, batch_index=0)
        xyz.apply_override(outer, "guided_loras", ("style",))
        script.process(outer, True, 1.5)
        script.process_batch(outer, True, 1.5)
        job_record = host.generation(outer).stats
        script.process_before_every_sampling(outer, True, 1.5, c=1, uc=2)
        script.postprocess_batch(outer, True, 1.5)
        _image(script, outer, lambda: _generate(script, _job(_ad_inner=True), True, 1.5), True)
        detailer_record = stats.BOARD.last
        host.loaded_loras = lambda: [("other.safetensors", "other")]
        outer.iteration = 1
        script.process_batch(outer, True, 1.5)
        assert "'style' not in the prompt" in outer.comments[-1], outer.comments
        assert detailer_record is not job_record and detailer_record.active and detailer_record.finished
        assert not job_record.active and job_record.finished and host.generation(outer) is None


@pytest.mark.parametrize("ours_first", [True, False])
def test_a_detailer_claim_stays_with_its_own_job_when_jobs_share_the_params_dict(ours_first):
    """X/Y/Z (and other scripts) run each cell on a shallow copy of `p`: the cells share one
    extra_generation_params dict. A cell whose detailer pass was guided must not make a later
    cell's images say so."""
    with sti.installed():
        module = _load_script()
        script = module.AutoLoraScript()
        module.ADAPTER = OneHost(steps=3)
        shared = {}
        infotexts = []
        for detailer_guides in (True, False):
            cell = _job(iteration=0, batch_index=0)
            cell.extra_generation_params = shared
            script.process(cell, True, 1.5)
            script.process_batch(cell, True, 1.5)
            script.process_before_every_sampling(cell, True, 1.5, c=1, uc=2)
            script.postprocess_batch(cell, True, 1.5)
            module.ADAPTER.steps = 3 if detailer_guides else 0
            infotexts.append(_image(script, cell, lambda: _generate(script, _job(_ad_inner=True), True, 1.5),
                                    ours_first))
            module.ADAPTER.steps = 3
            script.postprocess(cell, None, True, 1.5)
        assert infotexts[0].get(module.DETAILER_KEY) == "guided"
        assert module.DETAILER_KEY not in infotexts[1], infotexts[1]


@pytest.mark.parametrize("ours_first", [True, False])
def test_a_guided_adetailer_pass_is_named_in_the_infotext_of_its_image_only(ours_first):
    """ADetailer's order (scripts/!adetailer.py) inside processing's image loop: per batch
    (`p.iteration`) the outer batch is sampled and its postprocess_batch runs; then per image
    (`p.batch_index`) postprocess_image runs an inner img2img marked `_ad_inner`, with a copy of the
    outer infotext params and the same script objects, through its own process .. postprocess; then
    that image's infotext is written from the outer's params."""
    with sti.installed():
        module = _load_script()
        script = module.AutoLoraScript()
        module.ADAPTER = adapter = StandInAdapter(guided=1)
        outer = _p(batch_size=2)
        script.process(outer, True, 1.5)
        infotexts = {}
        guided_passes = {(0, 0): 2, (0, 1): 0, (1, 0): 0, (1, 1): 3}  # steps the detailer pass guided
        for outer.iteration in range(2):
            adapter.guided = 1
            script.process_batch(outer, True, 1.5)
            script.process_before_every_sampling(outer, True, 1.5, c=1, uc=2)
            script.postprocess_batch(outer, True, 1.5)
            for outer.batch_index in range(2):
                adapter.guided = guided_passes[outer.iteration, outer.batch_index]

                def detailer_pass():
                    inner = _p(_ad_inner=True)
                    inner.extra_generation_params.update(outer.extra_generation_params)
                    _generate(script, inner, True, 1.5)

                infotexts[outer.iteration, outer.batch_index] = _image(script, outer, detailer_pass, ours_first)
        for image, guided in guided_passes.items():
            assert infotexts[image]["AutoLoRA"] == "True", "the first pass's own claim stays"
            assert infotexts[image].get(module.DETAILER_KEY) == ("guided" if guided else None), (image, infotexts[image])
        script.postprocess(outer, None, True, 1.5)
        assert script.job is None, "the finished job is not kept"
        # a plain generation after: nothing carried over
        module.ADAPTER = StandInAdapter(guided=1)
        (info,) = _generate(script, _p(), True, 1.5)
        assert module.DETAILER_KEY not in info
