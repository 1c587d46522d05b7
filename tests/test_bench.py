"""The benchmark's arithmetic and requests (no server): paired ratios, medians, valid API args."""
import sys, pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import webui_bench as wb  # noqa: E402
from lib_autolora.params import settings_from_args  # noqa: E402


def test_paired_ratios_cancel_drift():
    # The machine slows down 2x in round 2; paired ratios stay 1.5 while unpaired medians would not.
    assert wb.paired_ratios([1.0, 2.0, 1.0], [1.5, 3.0, 1.5]) == [1.5, 1.5, 1.5]


def test_summarize_medians_and_peak_over_plain():
    plain = wb.Measurement([1.0, 1.2, 5.0], [], [100 * 2 ** 30, 100 * 2 ** 30, 100 * 2 ** 30])
    batched = wb.Measurement([1.1, 1.4, 5.5], [1.1, 1.17, 1.1], [103 * 2 ** 30] * 3)
    rows = {r["variant"]: r for r in wb.summarize({"c": {"plain": plain, "batched": batched}})}
    assert rows["plain"]["ratio"] == 1.0 and rows["plain"]["median_s"] == 1.2
    assert rows["batched"]["ratio"] == 1.1
    assert abs(rows["batched"]["peak_over_plain_pct"] - 3.0) < 1e-9
    assert "| c | batched | 1.40 | 1.10× | 103.00 | +3.0 % |" in wb.format_table(list(rows.values()))


def test_every_variant_sends_valid_autolora_args():
    case = wb.parse_case("sdxl-1024-4:random-sdxl.safetensors:random_lora_xl:1024:4")
    assert (case.size, case.batch) == (1024, 4)
    for variant in wb.VARIANTS:
        req = wb.request_for(case, variant, 20, 1, "Euler")
        assert f"<lora:{case.lora}:1>" in req["prompt"] and req["batch_size"] == 4
        if variant == "plain":
            assert "alwayson_scripts" not in req
            continue
        settings = settings_from_args(req["alwayson_scripts"]["AutoLoRA"]["args"])
        assert settings.enabled and settings.strategy == variant.split("-")[0]
        assert (settings.start, settings.end) == ((0.0, 0.5) if variant.endswith("interval50") else (0.0, 1.0))
