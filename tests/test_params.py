"""The one parameter table: API args (positional and named), validation and bounds, infotext round
trip, X/Y/Z, the settings class and the docs' controls table, all derived from it."""
import dataclasses
import pathlib

import pytest

from lib_autolora import params
from helpers import settings_from_infotext
from lib_autolora.params import (ARG_ORDER, PARAMS, XYZ_PARAMS, AutoLoraArgumentError, AutoLoraSettings,
                                 BY_NAME, coerce, infotext_fields, settings_from_args)

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "controls.md"


def test_positional_order_is_documented_order():
    # New parameters go at the end: scripts that send positional args keep working.
    assert ARG_ORDER == ("enabled", "gamma", "w1", "w2", "lora_scale", "start", "end", "guided_loras",
                         "strategy", "base_text_encoder", "schedule", "schedule_power", "schedule_floor", "cap",
                         "base_strength", "hr_gamma")
    s = settings_from_args([True, 2.0, 3.5, -1, 0.8, 0.1, 0.9, "a, b", "sequential", False])
    assert s == AutoLoraSettings(True, 2.0, 3.5, None, 0.8, 0.1, 0.9, ("a", "b"), "sequential", False)
    s = settings_from_args([True, 2.0, 3.5, -1, 0.8, 0.1, 0.9, "", "auto", True, "late", 2.0, 0.25, "off", 0.5, 1.2])
    assert (s.schedule, s.schedule_power, s.schedule_floor, s.cap, s.base_strength, s.hr_gamma) == \
        ("late", 2.0, 0.25, None, 0.5, 1.2)


def test_short_positional_list_takes_defaults():
    assert settings_from_args([True]) == AutoLoraSettings(enabled=True)
    assert settings_from_args([]) == AutoLoraSettings()


def test_named_dict_and_trailing_ui_defaults_ignored():
    s = settings_from_args([{"enabled": True, "gamma": 1.2, "w2": "cfg", "guided_loras": ["x"]}, 1.5, -1])
    assert s == AutoLoraSettings(enabled=True, gamma=1.2, guided_loras=("x",))


@pytest.mark.parametrize("args,message", [
    ([{"enabled": True, "gama": 2}], "unknown argument.*'gama'"),
    ([True, float("nan")], "'gamma' must be finite"),
    ([True, "1.5x"], "'gamma' must be a number"),
    ([True, True], "'gamma' must be a number"),
    (["yes"], "'enabled' must be true or false"),
    ([True, 1.5, -3], r"'w1' must be between 0 and 30 \(or -1 for the generation's CFG scale\), got -3"),
    ([True, 1.5, -1, 31], "'w2' must be between 0 and 30"),
    ([True, 1e30], "'gamma' must be between -10 and 10, got 1e\\+30"),
    ([True, -10.5], "'gamma' must be between -10 and 10"),
    ([True, 1.5, -1, -1, -0.5], "'lora_scale' must be between 0 and 4, got -0.5"),
    ([True, 1.5, -1, -1, 4.5], "'lora_scale' must be between 0 and 4"),
    ([True, 1.5, -1, -1, 1, 0.8, 0.2], "'start' .* must not exceed 'end'"),
    ([True, 1.5, -1, -1, 1, -0.1], "'start' must be between 0 and 1"),
    ([True, 1.5, -1, -1, 1, 0, 1.5], "'end' must be between 0 and 1"),
    ([{"enabled": True, "strategy": "fastest"}], "'strategy' must be one of auto, batched"),
    ([{"guided_loras": 3}], "'guided_loras' must be a comma-separated string"),
    ([0] * (len(ARG_ORDER) + len(params.UNSET_BOXES) + 1), f"at most {len(ARG_ORDER)}"),
])
def test_bad_values_have_clear_messages(args, message):
    with pytest.raises(AutoLoraArgumentError, match=message):
        settings_from_args(args)


def test_infotext_round_trip_every_setting():
    s = AutoLoraSettings(True, -0.5, 4.0, None, 0.75, 0.2, 0.85, ("style_a", "style b"), "swap", False)
    text = infotext_fields(s, "2")
    assert text == {"AutoLoRA": "True", "AutoLoRA gamma": "-0.5", "AutoLoRA w1": "4", "AutoLoRA LoRA scale": "0.75",
                    "AutoLoRA start": "0.2", "AutoLoRA end": "0.85", "AutoLoRA guided": "style_a, style b",
                    "AutoLoRA strategy": "swap", "AutoLoRA base TE": "False", "AutoLoRA version": "2"}, \
        "what differs from the defaults, and the version"
    assert settings_from_infotext(text) == s
    # an image made before the version key, with every key written: it pastes the same
    old = {p.infotext: {"optional": p.unset}.get(p.kind, str(p.default)) for p in PARAMS} | {
        "AutoLoRA": "True", "AutoLoRA gamma": "2", "AutoLoRA guided": ""}
    assert settings_from_infotext(old) == AutoLoraSettings(enabled=True, gamma=2.0)
    assert infotext_fields(AutoLoraSettings(enabled=False, gamma=3.0)) == {}
    assert settings_from_infotext({}) == AutoLoraSettings()


def test_the_infotext_marks_the_strategy_auto_picked():
    assert params.strategy_that_ran("auto", "dual") == "dual (auto)"
    assert params.strategy_that_ran("swap", "batched") == "batched", "a fallback from the user's choice: what ran"
    for requested, ran in (("auto", "batched"), ("sequential", "sequential")):
        written = params.strategy_that_ran(requested, ran)
        assert settings_from_infotext({"AutoLoRA": "True", "AutoLoRA strategy": written}).strategy == requested, \
            "pasting restores the user's choice, not a strategy auto picked"
    # version 2 wrote the strategy that ran unmarked: it pastes as written
    version_2 = {"AutoLoRA": "True", "AutoLoRA strategy": "dual", "AutoLoRA version": "2"}
    assert settings_from_infotext(version_2).strategy == "dual"


def test_ui_values_follow_arg_order_and_parse_back():
    s = AutoLoraSettings(True, 2.0, None, 6.0, 1.0, 0.0, 0.5, ("a",), "batched", True)
    assert settings_from_args(params.ui_values(s)) == s


def test_xyz_axes_cover_every_number_and_enabled():
    assert {p.name for p in XYZ_PARAMS} == set(ARG_ORDER) - {"guided_loras"}  # a name list has no grid syntax
    assert coerce(BY_NAME["gamma"], " 2.5 ") == 2.5
    assert coerce(BY_NAME["enabled"], "False") is False
    assert coerce(BY_NAME["strategy"], " Swap ") == "swap"
    with pytest.raises(AutoLoraArgumentError):
        coerce(BY_NAME["w1"], "inf")


def test_every_param_has_label_tooltip_and_unique_infotext_key():
    assert len({p.infotext for p in PARAMS}) == len(PARAMS)
    assert all(p.label and len(p.tooltip) > 20 for p in PARAMS)


def test_every_bound_is_accepted_at_its_ends_and_refused_beyond():
    for p in PARAMS:
        if p.bounds is None:
            continue
        low, high = p.bounds
        assert coerce(p, low) == (None if p.kind == "optional" and low == params.UNSET else low)
        assert coerce(p, high) == high
        for outside in (low - 0.01, high + 0.01):
            if p.kind == "optional" and outside == params.UNSET:
                continue
            with pytest.raises(AutoLoraArgumentError, match=f"'{p.name}' must be between"):
                coerce(p, outside)
        # the UI slider shows a common range inside the bounds
        s_low, s_high, _step = p.slider
        assert low <= s_low and s_high <= high
        assert s_low <= (p.slider_default if p.kind == "optional" else p.default) <= s_high


def test_every_position_of_every_control_is_a_valid_value():
    """What the UI can send: each slider at every step of its range, each box ticked or not, each
    choice; all of them are valid settings, and a slider's position is the value used unless its
    "unset" box is ticked."""
    defaults = params.ui_values(AutoLoraSettings())
    for i, p in enumerate(PARAMS):
        if p.kind in ("float", "optional"):
            low, high, step = p.slider
            positions = [round(low + k * step, 10) for k in range(int(round((high - low) / step)) + 1)]
            assert positions[-1] == pytest.approx(high)
        else:
            positions = {"bool": [False, True], "choice": list(p.choices), "names": ["", "a, b"]}[p.kind]
        boxes = [False, True] if p.kind == "optional" else [None]
        for position in positions:
            for ticked in boxes:
                values = list(defaults)
                values[i] = position
                if ticked is not None:
                    values[len(ARG_ORDER) + params.UNSET_BOXES.index(p)] = ticked
                if p.name == "start":
                    values[ARG_ORDER.index("end")] = 1.0
                if p.name == "end":
                    values[ARG_ORDER.index("start")] = 0.0
                value = getattr(settings_from_args(values), p.name)
                if p.kind in ("float", "optional"):
                    assert value == (None if ticked else pytest.approx(position)), (p.name, position, ticked)


def test_the_settings_class_is_the_table():
    fields = dataclasses.fields(AutoLoraSettings)
    assert tuple(f.name for f in fields) == ARG_ORDER
    assert AutoLoraSettings() == AutoLoraSettings(**{p.name: p.setting_default for p in PARAMS})
    assert AutoLoraSettings().w1 is None and AutoLoraSettings().guided_loras == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        AutoLoraSettings().gamma = 2.0
    with pytest.raises(AutoLoraArgumentError, match="must not exceed"):
        AutoLoraSettings(enabled=True, end=0.5).with_overrides({"start": 0.7})


def test_the_documented_positional_example_is_an_enabled_run_with_the_defaults():
    assert settings_from_args(params.positional_example()) == AutoLoraSettings(enabled=True)
    assert len(params.positional_example()) == len(ARG_ORDER)


def test_docs_controls_table_is_generated_from_the_table():
    text = params.controls_markdown()
    for p in PARAMS:
        assert f"| `{p.name}` |" in text and p.tooltip in text and f"`{p.infotext}`" in text
    assert DOCS.read_text() == text, "docs/controls.md is stale: python -m lib_autolora.params > docs/controls.md"
