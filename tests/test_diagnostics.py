"""The stats record's timing fields: what the garbage collector took during a generation."""
import gc

from lib_autolora.hosts import common
from lib_autolora.params import AutoLoraSettings


class _Cycle:
    def __init__(self):
        self.me = self


def test_the_record_counts_full_collections_and_their_time_between_begin_and_end():
    settings = AutoLoraSettings(enabled=True)
    was_enabled = gc.isenabled()
    gc.disable()  # only the collections this test makes
    try:
        record = common.DIAGNOSTICS.begin("standin", settings)
        garbage = [_Cycle() for _ in range(20000)]
        del garbage
        gc.collect()
        gc.collect(0)  # a young collection: timed, not counted as full
        common.DIAGNOSTICS.end(record)
        assert record["gc_full_collections"] == 1 and record["gc_ms"] > 0
        quiet = common.DIAGNOSTICS.begin("standin", settings)
        common.DIAGNOSTICS.end(quiet)
        assert quiet["gc_full_collections"] == 0 and quiet["gc_ms"] == 0
    finally:
        if was_enabled:
            gc.enable()
    assert gc.callbacks.count(common.GC_CLOCK) == 1, "installed once however many generations ran"
