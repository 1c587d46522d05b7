"""The lifecycle every host adapter shares (lib_autolora/hosts/adapter.py), through a host that
records what it is asked to do: refusals, the one generation slot, guided-LoRA selection per batch
and for the hires pass, the CFG-1 notice, and a finish that always closes the stats record."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from lib_autolora import diagnostics, stats
from lib_autolora.hosts.adapter import CFG_1, NO_LORA, NO_LORA_EXTENSION, Adapter
from lib_autolora.params import AutoLoraArgumentError, AutoLoraSettings


class RecordingHost(Adapter):
    name = "recording"

    def __init__(self, loaded=(("a.safetensors", "a"), ("b.safetensors", "b")), refuse=None):
        super().__init__()
        self.loaded, self.refuse, self.calls = list(loaded) if loaded is not None else None, refuse, []

    def loaded_loras(self):
        return self.loaded

    def refusal(self, p):
        return self.refuse

    def open_batch(self, p, gen):
        self.calls.append(("open_batch", gen.guided))

    def bind_pass(self, p, gen, c, uc):
        self.calls.append(("bind_pass", gen.hires, gen.guided))

    def close(self, gen, p):
        self.calls.append(("close", p))


def job(**kwargs):
    notes = []
    return SimpleNamespace(comment=notes.append, notes=notes, cfg_scale=7.0, is_hr_pass=False, **kwargs)


def test_a_batch_selects_the_guided_loras_and_the_generation_lives_in_one_slot():
    host, p = RecordingHost(), job()
    assert host.start_batch(p, AutoLoraSettings(enabled=True, guided_loras=("b",))) is None
    gen = host.generation(p)
    assert gen.guided == {"b.safetensors"} and gen.loaded == ("a.safetensors", "b.safetensors")
    assert gen.stats.active and gen.stats.guided_loras == ["b"]
    assert host.start_batch(p, AutoLoraSettings(enabled=True)) is None and host.generation(p) is gen, "batch 2"
    host.before_sampling(p, c=object(), uc=object())
    assert host.calls == [("open_batch", {"b.safetensors"})] * 2 + [("bind_pass", False, {"b.safetensors"})]
    host.finish(p)
    host.finish(p)  # idempotent
    assert host.calls[-1] == ("close", p) and host.calls.count(("close", p)) == 1
    assert gen.stats.finished and host.generation(p) is None and stats.BOARD.open_runs() == 0


@pytest.mark.parametrize("loaded, refuse, notice", [
    (None, None, NO_LORA_EXTENSION), ((), None, NO_LORA), ((("a.safetensors", "a"),), "AutoLoRA: not this model", None)])
def test_refusals_come_back_as_notices_and_close_the_record(loaded, refuse, notice):
    host, p = RecordingHost(loaded=loaded, refuse=refuse), job()
    assert host.start_batch(p, AutoLoraSettings(enabled=True)) == (notice or refuse)
    assert host.generation(p) is None and stats.BOARD.last.finished and not stats.BOARD.last.active
    assert ("open_batch", frozenset()) not in host.calls


def test_a_generation_whose_postprocess_never_ran_is_finished_by_the_next():
    host, first, second = RecordingHost(), job(), job()
    host.start_batch(first, AutoLoraSettings(enabled=True))
    stale = host.generation(first)
    host.finish(second)  # another job's finish leaves it alone
    assert host.generation(first) is stale
    host.start_batch(second, AutoLoraSettings(enabled=True))
    assert stale.stats.finished and ("close", first) in host.calls and host.generation(second) is not None


class StatefulHost(RecordingHost):
    """Holds per-generation host state as the real bindings do (their pass bound until close)."""

    def open_batch(self, p, gen):
        if gen.host_state is None:
            gen.host_state = SimpleNamespace(bound=False, opened_for=p)
        self.calls.append(("open_batch", p))

    def bind_pass(self, p, gen, c, uc):
        assert all(g.host_state is None for _, g in self.waiting), "a waiting generation still holds the host"
        gen.host_state.bound = True
        self.calls.append(("bind_pass", p))

    def close(self, gen, p):
        if gen.host_state is not None:
            gen.host_state.bound = False
        self.calls.append(("close", p))


def test_a_nested_job_makes_the_running_generation_wait_and_it_binds_again_after():
    """ADetailer runs a whole job (its inpainting pass) inside an image's postprocessing: the job's
    generation lets go of the host for it and, at its next batch, binds again as the same
    generation."""
    host, outer, inner = StatefulHost(), job(), job()
    host.start_batch(outer, AutoLoraSettings(enabled=True))
    host.before_sampling(outer, c=object(), uc=object())
    gen = host.generation(outer)
    gen.stats.guided_steps += 4
    host.suspend()
    assert gen.host_state is None and host.calls[-1] == ("close", outer) and host.generation(outer) is gen
    host.start_batch(inner, AutoLoraSettings(enabled=True, gamma=0.5))
    host.before_sampling(inner, c=object(), uc=object())
    nested = host.generation(inner)
    host.before_sampling(outer, c=object(), uc=object())  # not its turn: nothing is bound for it
    assert host.calls[-1] == ("bind_pass", inner)
    host.finish(inner)
    assert nested.stats.finished and not gen.stats.finished
    host.start_batch(outer, AutoLoraSettings(enabled=True))
    host.before_sampling(outer, c=object(), uc=object())
    assert host.generation(outer) is gen and gen.host_state.bound and host.calls[-2:] == [
        ("open_batch", outer), ("bind_pass", outer)]
    assert gen.stats.guided_steps == 4, "the job's record goes on"
    host.finish(outer)
    assert gen.stats.finished and gen.host_state is None and host.generation(outer) is None


def test_generations_a_raised_job_left_waiting_are_finished_with_the_next_job():
    host, outer, inner = StatefulHost(), job(), job()
    host.start_batch(outer, AutoLoraSettings(enabled=True))
    outer_gen = host.generation(outer)
    host.suspend()
    host.start_batch(inner, AutoLoraSettings(enabled=True))
    inner_gen = host.generation(inner)
    host.finish(None)  # the script, at the next job's process
    assert outer_gen.stats.finished and inner_gen.stats.finished
    assert host.generation(outer) is None and host.generation(inner) is None and not host.waiting


def test_unknown_guided_names_raise_for_the_script_to_report():
    host = RecordingHost()
    with pytest.raises(AutoLoraArgumentError, match="'x'"):
        host.start_batch(job(), AutoLoraSettings(enabled=True, guided_loras=("x",)))


def test_the_hires_pass_selects_again_or_runs_plain():
    host, p = RecordingHost(), job()
    host.start_batch(p, AutoLoraSettings(enabled=True, guided_loras=("a",), w1=3.0))
    p.is_hr_pass, p.cfg_scale = True, 1.0
    host.loaded = [("c.safetensors", "c")]  # the hires prompt names another LoRA
    host.before_sampling(p, c=object(), uc=None)
    assert not any(call[0] == "bind_pass" for call in host.calls)
    assert any("'a'" in note and "hires pass runs without AutoLoRA" in note for note in p.notes)
    host.loaded = [("a.safetensors", "a"), ("c.safetensors", "c")]
    host.before_sampling(p, c=object(), uc=None)
    assert host.calls[-1] == ("bind_pass", True, {"a.safetensors"})
    assert CFG_1 in p.notes, "w1 set, CFG 1: the user is told it does not apply"
    host.loaded = []
    host.before_sampling(p, c=object(), uc=None)
    assert "AutoLoRA: no LoRA in the hires prompt; the hires pass runs without AutoLoRA" in p.notes


def test_a_webui_the_binding_cannot_carry_gets_the_honest_refusal(monkeypatch):
    """A Forge-family WebUI whose backend moved what the binding reads (here: its sampler runs no
    conditioning modifiers): the adapter is the UnavailableAdapter with the reason, whatever its name."""
    from lib_autolora import hosts
    from lib_autolora.hosts.forge import api
    reason = "its sampler does not run conditioning modifiers before it samples"
    monkeypatch.setattr(api, "host_api", lambda: (api.LdmPatchedAPI, reason))
    adapter = hosts.select_adapter()
    assert not adapter.available and adapter.reason == reason
    assert adapter.start_batch(job(), AutoLoraSettings(enabled=True)) == f"AutoLoRA is unavailable on this WebUI: {reason}"
    assert adapter.generation(job()) is None


def _fragmented_heap(blocks=3000, size=64 * 1024):
    """Allocates `blocks` heap blocks (below glibc's mmap threshold, so from the arena), touches
    them, frees all but every tenth: ~170 MB free but pinned between live blocks, which glibc keeps
    resident until malloc_trim hands the free pages back (what a dense-delta generation left)."""
    import ctypes
    import ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(size) for _ in range(blocks)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    kept = blocks[::10]
    for i, b in enumerate(blocks):
        if i % 10:
            libc.free(b)
    return lambda: [libc.free(b) for b in kept]


@pytest.mark.skipif(not sys.platform.startswith("linux") or diagnostics.trimmed_resident_bytes() is None,
                    reason="glibc's malloc_trim")
@pytest.mark.parametrize("dense_layers", [0, 12])
def test_a_generation_with_dense_deltas_gives_its_freed_heap_back_to_the_os(dense_layers):
    """Dense deltas (DoRA, OFT, ...) are layer-sized float32 copies freed at the end of the
    generation; glibc keeps such freed memory resident, and a WebUI grew by gigabytes a call until
    the machine ran out. finish() trims the heap after a generation that had them (only then: the
    trim walks the whole heap)."""
    diagnostics.release_free_heap()
    host, p = RecordingHost(), job()
    host.start_batch(p, AutoLoraSettings(enabled=True))
    host.generation(p).stats.dense_layers = dense_layers
    free_kept = _fragmented_heap()
    before = diagnostics.resident_bytes()
    host.finish(p)
    returned = before - diagnostics.resident_bytes()
    free_kept()
    if dense_layers:
        assert returned > 100 * 2**20, f"only {returned / 2**20:.0f} MiB of ~170 went back"
    else:
        assert returned < 50 * 2**20, f"{returned / 2**20:.0f} MiB went back without dense deltas"


def test_the_users_strategy_settings_reach_the_strategy_choice():
    """Settings → AutoLoRA: the strategy 'auto' stands for, and the swap budget in MB (0: free
    memory), as both bindings pass them (adapter.open_strategy)."""
    import torch

    from lib_autolora.factors import LoraFactors, LowRankTerm
    from lib_autolora.generation import Generation
    from lib_autolora.hosts.adapter import open_strategy

    layer = torch.nn.Linear(1024, 1024)  # 4 MiB of weight: what 'swap' would keep a copy of
    factors = LoraFactors()
    factors.add(layer, "layer", LowRankTerm(down=torch.randn(4, 1024), up=torch.randn(1024, 4), scale=0.5))
    compute_bound = dict(weights_merged=True, latent_pixels_per_branch=10 ** 6, free_bytes=2 ** 34)

    def chosen(**opts):
        gen = Generation(AutoLoraSettings(), "stand-in host")
        p = SimpleNamespace(comment=lambda _text: None)
        try:
            open_strategy(gen, SimpleNamespace(**opts), factors, p, **compute_bound)
            return gen.stats.strategy
        finally:
            gen.close_strategy()

    assert chosen() == "swap", "no settings: 'auto' by the rule, the free memory the budget"
    assert chosen(autolora_default_strategy="sequential") == "sequential"
    assert chosen(autolora_swap_budget_mb=0) == "swap", "0 MB: the free memory"
    assert chosen(autolora_swap_budget_mb=1) == "batched", "a 1 MB budget holds no 4 MiB copy"
    assert chosen(autolora_swap_budget_mb=8) == "swap"


@pytest.mark.parametrize("held_by", ["host state", "strategy"])
def test_the_generations_own_objects_are_gone_when_the_heap_is_trimmed(monkeypatch, held_by):
    """The trim hands back only memory that is free: the generation's objects (the host's factors,
    the strategy's dense deltas) must be released before it runs, though the caller still holds the
    Generation (the script keeps it for the line under the images). A dense delta held past the
    trim stays in glibc's heap: the WebUI grew by a layer-sized copy per call (OFT on Forge Neo)."""
    import gc
    import weakref

    import torch

    from lib_autolora import memory
    from lib_autolora.factors import DenseTerm, LoraFactors, ModuleDelta

    class DenseHost(RecordingHost):
        def open_batch(self, p, gen):
            dense = torch.zeros(64, 64)
            self.dense = weakref.ref(dense)
            gen.stats.dense_layers = 1
            if held_by == "host state":
                gen.host_state = SimpleNamespace(factors={"layer": dense})
                return
            layer = torch.nn.Linear(64, 64)
            delta = ModuleDelta.for_module(layer)
            delta.add(DenseTerm(dense))
            factors = LoraFactors()
            factors.deltas[layer], factors.names[layer] = delta, "layer"
            x = torch.randn(2, 64)
            gen.open_strategy(factors).evaluate(layer, (x,), (x,))  # builds its hooks on the layer

    alive_at_trim = []
    monkeypatch.setattr(memory, "return_free_heap", lambda: alive_at_trim.append(host.dense() is not None))
    host, p = DenseHost(), job()
    collecting = gc.isenabled()
    gc.disable()  # what is released must go by reference counting: a collection may run only much later
    try:
        host.start_batch(p, AutoLoraSettings(enabled=True, strategy="sequential"))
        gen = host.generation(p)
        assert (gen.strategy is not None) == (held_by == "strategy")
        host.finish(p)
    finally:
        if collecting:
            gc.enable()
    assert alive_at_trim == [False], "the dense delta was still held when the heap was trimmed"
    assert gen.stats.finished
