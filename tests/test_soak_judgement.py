"""How tests/e2e/soak.py judges memory, on made-up readings (no WebUI): a one-time step of raw RSS
is reported, growth of held memory (RSS after trim, live tensors) fails the run."""
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
import soak  # noqa: E402

MB = 2 ** 20


def judge(raw, trimmed, tensors, warmup_calls=2):
    run = soak.Soak(SimpleNamespace(url="http://127.0.0.1:1", webui_dir=None, seed=0,
                                    rss_tolerance_mb=256, tensor_tolerance_mb=32))
    run.readings = [(n, {"resident": r * MB, "resident after trim": t * MB, "live tensors": x * MB},
                     "AutoLoRA on" if n % 2 else "bad arguments")
                    for n, (r, t, x) in enumerate(zip(raw, trimmed, tensors), start=1)]
    mb = lambda b: "n/a" if b is None else f"{b / MB:.0f} MB"  # noqa: E731
    return run.memory_report(warmup_calls, mb)


def test_a_step_of_raw_rss_alone_passes_and_is_located():
    lines, ok = judge(raw=[8000, 8000, 8000, 9200, 9200, 9200], trimmed=[7000] * 6, tensors=[3000] * 6)
    assert ok, lines
    assert "1200 MB at call 4 (bad arguments)" in lines[-1]


def test_growth_of_live_tensors_fails():
    lines, ok = judge(raw=[8000] * 6, trimmed=[7000] * 6, tensors=[3000, 3000, 3010, 3020, 3030, 3040])
    assert not ok
    assert any(line.startswith("live tensors") and "NOT FLAT" in line for line in lines), lines


def test_growth_of_trimmed_rss_fails_even_when_tensors_are_flat():
    lines, ok = judge(raw=[8000] * 6, trimmed=[7000, 7000, 7100, 7200, 7300, 7400], tensors=[3000] * 6)
    assert not ok
    assert any(line.startswith("resident after trim") and "NOT FLAT" in line for line in lines), lines
