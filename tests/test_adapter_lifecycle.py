"""The lifecycle every host adapter shares (lib_autolora/hosts/adapter.py), through a host that
records what it is asked to do: refusals, the one generation slot, guided-LoRA selection per batch
and for the hires pass, the CFG-1 notice, and a finish that always closes the stats record."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from lib_autolora import stats
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
