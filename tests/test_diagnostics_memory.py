"""The soak's memory readings (lib_autolora/diagnostics.py) on this process."""
import sys

import pytest
import torch

from lib_autolora import diagnostics


def test_live_tensor_bytes_counts_what_is_held_once_and_forgets_what_is_freed():
    before, storages = diagnostics.live_tensor_bytes()
    held = torch.zeros(1000, 250)  # 1,000,000 bytes
    view = held[10:]  # shares the storage: not counted again
    assert diagnostics.live_tensor_bytes() == (before + 1_000_000, storages + 1)
    leak = [lambda kept=held: kept]  # what the Forge leak looked like: a function keeping a tensor alive
    del held, view
    assert diagnostics.live_tensor_bytes() == (before + 1_000_000, storages + 1)
    leak.clear()
    assert diagnostics.live_tensor_bytes() == (before, storages)


def test_live_tensor_bytes_skips_what_holds_no_cpu_memory():
    before = diagnostics.live_tensor_bytes()
    meta = torch.empty(1000, 1000, device="meta")
    empty = torch.empty(0)
    assert diagnostics.live_tensor_bytes() == before
    del meta, empty


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's malloc_trim")
def test_trimmed_resident_memory_is_read_on_linux():
    raw = diagnostics.resident_bytes()
    trimmed = diagnostics.trimmed_resident_bytes()
    assert raw > 0 and trimmed > 0


def test_residue_does_not_count_tensors_only_garbage_holds():
    """A reference cycle that holds a tensor and nothing else reaches is garbage, not a leak: the
    residue reading collects it before counting live tensors."""
    import gc
    gc.collect()
    before = diagnostics.residue_counts({}, [])["tensor_bytes"]
    gc.disable()  # keep the collector from running between here and the reading
    try:
        cycle = {"tensor": torch.zeros(1000, 250)}
        cycle["self"] = cycle
        del cycle
        assert diagnostics.live_tensor_bytes()[0] == before + 1_000_000  # still there, unreachable
        assert diagnostics.residue_counts({}, [])["tensor_bytes"] == before
    finally:
        gc.enable()
