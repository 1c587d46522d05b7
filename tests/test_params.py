"""The one parameter table: API args (positional and named), validation, infotext round trip, XYZ."""
import math

import pytest

from lib_autolora.params import (ARG_ORDER, PARAMS, XYZ_PARAMS, AutoLoraArgumentError, AutoLoraSettings,
                                 BY_NAME, infotext_fields, settings_from_args, settings_from_infotext, ui_values,
                                 xyz_value)


def test_positional_order_is_documented_order():
    assert ARG_ORDER == ("enabled", "gamma", "w1", "w2", "lora_scale", "start", "end", "guided_loras",
                         "strategy", "base_text_encoder")
    s = settings_from_args([True, 2.0, 3.5, -1, 0.8, 0.1, 0.9, "a, b", "sequential", False])
    assert s == AutoLoraSettings(True, 2.0, 3.5, None, 0.8, 0.1, 0.9, ("a", "b"), "sequential", False)


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
    ([True, 1.5, -3], "'w1' must be >= 0"),
    ([True, 1.5, -1, -1, -0.5], "'lora_scale' must be >= 0"),
    ([True, 1.5, -1, -1, 1, 0.8, 0.2], "'start' .* must not exceed 'end'"),
    ([True, 1.5, -1, -1, 1, 0, 1.5], "'end' is a fraction"),
    ([{"enabled": True, "strategy": "fastest"}], "'strategy' must be one of auto, batched"),
    ([{"guided_loras": 3}], "'guided_loras' must be a comma-separated string"),
    ([True] * 11, "at most 10"),
])
def test_bad_values_have_clear_messages(args, message):
    with pytest.raises(AutoLoraArgumentError, match=message):
        settings_from_args(args)


def test_infotext_round_trip_every_setting():
    s = AutoLoraSettings(True, -0.5, 4.0, None, 0.75, 0.2, 0.85, ("style_a", "style b"), "swap", False)
    text = infotext_fields(s)
    assert text["AutoLoRA gamma"] == "-0.5" and text["AutoLoRA w2"] == "cfg"
    assert settings_from_infotext(text) == s
    assert infotext_fields(AutoLoraSettings(enabled=False, gamma=3.0)) == {}
    assert settings_from_infotext({}) == AutoLoraSettings()


def test_ui_values_follow_arg_order_and_parse_back():
    s = AutoLoraSettings(True, 2.0, None, 6.0, 1.0, 0.0, 0.5, ("a",), "batched", True)
    assert settings_from_args(ui_values(s)) == s


def test_xyz_axes_cover_every_number_and_enabled():
    assert {p.name for p in XYZ_PARAMS} == {"enabled", "gamma", "w1", "w2", "lora_scale", "start", "end"}
    assert xyz_value(BY_NAME["gamma"], " 2.5 ") == 2.5
    assert xyz_value(BY_NAME["enabled"], "False") is False
    with pytest.raises(AutoLoraArgumentError):
        xyz_value(BY_NAME["w1"], "inf")


def test_every_param_has_label_tooltip_and_unique_infotext_key():
    assert len({p.infotext for p in PARAMS}) == len(PARAMS)
    assert all(p.label and len(p.tooltip) > 20 for p in PARAMS)
