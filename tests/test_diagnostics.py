"""The stats record's timing fields: what the garbage collector took during a generation (with
diagnostics on only)."""
import gc

from lib_autolora import diagnostics, params, stats
from lib_autolora.params import AutoLoraSettings


class _Cycle:
    def __init__(self):
        self.me = self


def test_the_record_counts_full_collections_and_their_time_between_begin_and_end():
    settings = params.as_dict(AutoLoraSettings(enabled=True))
    was_enabled = gc.isenabled()
    gc.disable()  # only the collections this test makes
    clock = diagnostics.GcClock().install()
    stats.BOARD.gc_clock = clock
    try:
        record = stats.BOARD.begin("standin", settings)
        garbage = [_Cycle() for _ in range(20000)]
        del garbage
        gc.collect()
        gc.collect(0)  # a young collection: timed, not counted as full
        record.end(None)
        assert record.gc_full_collections == 1 and record.gc_ms > 0
        quiet = stats.BOARD.begin("standin", settings)
        quiet.end(None)
        assert quiet.gc_full_collections == 0 and quiet.gc_ms == 0
        assert clock.install() is clock and gc.callbacks.count(clock) == 1, "installed once"
    finally:
        stats.BOARD.gc_clock = None
        gc.callbacks.remove(clock)
        if was_enabled:
            gc.enable()
    plain = stats.BOARD.begin("standin", settings)
    plain.end(None)
    assert plain.gc_ms is None and plain.finished, "without diagnostics no clock runs"


def test_the_snapshot_is_json_of_the_last_generation():
    record = stats.BOARD.begin("standin", params.as_dict(AutoLoraSettings(enabled=True, guided_loras=("a",))))
    record.notices.append("a notice")
    snap = stats.BOARD.snapshot()
    assert snap["generation"] == record.generation and snap["settings"]["guided_loras"] == ["a"]
    assert snap["notices"] == ["a notice"] and "_gc_at_begin" not in snap
    record.notices.append("later")
    assert snap["notices"] == ["a notice"], "a snapshot is a copy"
