"""bench/host_steps.py on an excerpt of a real Forge log from the GPU run (three SD1.5 requests)."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import host_steps as hs  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"
HOST = (DATA / "forge_log_excerpt.txt").read_text()
BENCH = (DATA / "bench_log_excerpt.txt").read_text()


def test_one_sampler_rate_per_answered_request_and_not_the_job_bar():
    rates = hs.seconds_per_step(HOST)
    assert len(rates) == 3 == len(hs.bench_requests(BENCH))
    # The sampler bars' final rates (12.96, 17.01, 10.62 it/s), not "Total progress" (13.94, ...).
    assert [round(1 / r, 2) for r in rates] == [12.96, 17.01, 10.62]


def test_table_splits_whole_images_into_steps_and_the_rest():
    rows = {r["variant"]: r for r in hs.per_step_table(HOST, BENCH)}
    assert set(rows) == {"batched", "dual", "sequential"}
    dual = rows["dual"]
    assert dual["whole_s"] == 1.39 and abs(dual["ms_per_step"] - 1000 / 17.01) < 1e-6
    assert 0 < dual["outside_loop_s"] < dual["whole_s"]
    assert dual["per_step_vs_plain"] is None  # no plain request in the excerpt


def test_logs_that_do_not_pair_up_are_refused():
    with pytest.raises(ValueError, match="3 answered requests"):
        hs.per_step_table(HOST, BENCH.splitlines(keepends=True)[0])
