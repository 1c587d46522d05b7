"""The benchmark's arithmetic and requests (no server): paired ratios, medians, valid API args."""
import sys
import pathlib

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


def test_peak_is_read_from_the_webuis_memory_endpoint():
    # The shape of A1111's and Forge's GET /sdapi/v1/memory (modules/api/api.py get_memory).
    answer = {"ram": {"used": 1}, "cuda": {"allocated": {"current": 5, "peak": 7 * 2 ** 30},
                                           "reserved": {"current": 9, "peak": 9}}}
    assert wb.peak_allocated(answer) == 7 * 2 ** 30
    assert wb.peak_allocated({"ram": {}, "cuda": {"error": "unavailable"}}) is None  # a CPU host
    assert wb.peak_allocated(None) is None


def test_benchmark_pairs_rounds_and_saves_after_each(monkeypatch):
    """Drive `benchmark` against a stand-in of run_one: plain takes 1 s, dual 1.2 s; the machine
    slows down 2x in the second timed round; warm-up rounds run only the variants asked for."""
    calls, saved = [], []

    def fake_run_one(url, req):
        variant = "plain" if "alwayson_scripts" not in req else req["alwayson_scripts"]["AutoLoRA"]["args"][0]["strategy"]
        slow = 2.0 if req["seed"] == 1002 else 1.0
        calls.append((req["seed"], variant))
        stats = None if variant == "plain" else {"strategy": variant, "base_calls": 20}
        return (1.0 if variant == "plain" else 1.2) * slow, "d", stats, (100 if variant == "plain" else 103) * 2 ** 30

    monkeypatch.setattr(wb, "run_one", fake_run_one)
    case = wb.parse_case("c:ck:lo:64:1")
    results = wb.benchmark("u", [case], ["plain", "dual"], rounds=2, steps=2, sampler="Euler", warmup=1,
                           log=lambda *_: None, warmup_variants={"plain"}, on_round=lambda r: saved.append(1))
    assert [c for c in calls if c[0] == 1000] == [(1000, "plain")]  # warm-up: plain only
    rows = {r["variant"]: r for r in wb.summarize(results)}
    assert abs(rows["dual"]["ratio"] - 1.2) < 1e-9 and rows["dual"]["ran"] == ["dual"]
    assert abs(rows["dual"]["peak_over_plain_pct"] - 3.0) < 1e-9
    assert len(saved) == 2  # after each timed round


def test_a_case_timed_on_the_wrong_checkpoint_fails():
    import json
    import pytest
    req = wb.request_for(wb.parse_case("c:rand_sdxl.safetensors:lo:1024:1"), "plain", 2, 1, "Euler")
    wb.check_model(req, json.dumps({"sd_model_name": "rand_sdxl"}))  # the right one: no error
    with pytest.raises(RuntimeError, match="rand_sd15"):
        wb.check_model(req, json.dumps({"sd_model_name": "rand_sd15"}))


def test_floor_is_plain_generation_of_twice_the_batch():
    case = wb.parse_case("c:ck:lo:1024:4")
    floor, plain = wb.request_for(case, "floor", 20, 1, "Euler"), wb.request_for(case, "plain", 20, 1, "Euler")
    assert "alwayson_scripts" not in floor and floor["batch_size"] == 8
    assert {k: v for k, v in floor.items() if k != "batch_size"} == {k: v for k, v in plain.items() if k != "batch_size"}


def test_unet_step_narrowing_keeps_every_layer_and_valid_heads():
    import unet_step
    sd15 = {"block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8}
    sdxl = {"block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20]}
    assert unet_step.narrowed(sd15, 1) is sd15
    n = unet_step.narrowed(sd15, 10)
    assert n["block_out_channels"] == [32, 64, 128, 128] and n["attention_head_dim"] == [8, 8, 8, 8]
    n = unet_step.narrowed(sdxl, 10)
    assert n["block_out_channels"] == [32, 64, 128]
    assert all(w % h == 0 for w, h in zip(n["block_out_channels"], n["attention_head_dim"]))
    assert sdxl["block_out_channels"] == [320, 640, 1280]  # the caller's config is left alone


def test_unet_step_lora_covers_transformer_linears_and_1x1_convs_only():
    import torch
    import unet_step

    class Block(torch.nn.Module):  # diffusers' names: down_blocks.0.attentions.0.proj_in, ...
        def __init__(self):
            super().__init__()
            self.proj_in = torch.nn.Conv2d(8, 8, 1)
            self.to_q = torch.nn.Linear(8, 8)
            self.conv3 = torch.nn.Conv2d(8, 8, 3)

    unet = torch.nn.Module()
    unet.attentions = torch.nn.ModuleList([Block()])
    unet.resnets = torch.nn.ModuleList([torch.nn.Linear(8, 8)])
    targets = unet_step.lora_targets(unet)
    assert sorted(targets) == ["attentions.0.proj_in", "attentions.0.to_q"]
    factors = unet_step.random_lora(targets, rank=4)
    x = torch.randn(2, 8)
    delta = factors.deltas[targets["attentions.0.to_q"]]
    assert delta.forward(x).abs().max() > 0  # the LoRA changes the layer
    assert delta.delta_weight().shape == (8, 8)


# -- step_ops: per-step counts from the WebUI's profiler traces ------------------------------------

def _trace(path, steps, extra_ops=()):
    """A Chrome trace as torch.profiler writes it: per step one `aten::linear` holding an
    `aten::addmm` (nested), one launch and one 2 ms kernel; plus one-time work outside the loop
    (`extra_ops`) and a blocking copy."""
    events, ts = [], 0
    for name in extra_ops:
        events.append({"cat": "cpu_op", "name": name, "ts": ts, "dur": 5, "tid": 1})
        ts += 10
    for _ in range(steps):
        events.append({"cat": "cpu_op", "name": "aten::linear", "ts": ts, "dur": 100, "tid": 1})
        events.append({"cat": "cpu_op", "name": "aten::addmm", "ts": ts + 10, "dur": 50, "tid": 1})
        events.append({"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts + 20, "dur": 4, "tid": 1})
        events.append({"cat": "kernel", "name": "gemm", "ts": ts + 30, "dur": 2000, "tid": 7})
        ts += 200
    events.append({"cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": ts, "dur": 300, "tid": 1})
    path.write_text(__import__("json").dumps({"traceEvents": events}))
    return str(path)


def test_step_ops_counts_one_step_and_cancels_work_outside_the_loop(tmp_path):
    import step_ops
    one_time = ("aten::empty", "aten::copy_")
    low = step_ops.trace_counts(_trace(tmp_path / "a.json", 2, one_time))
    high = step_ops.trace_counts(_trace(tmp_path / "b.json", 5, one_time))
    assert low["ops"]["aten::linear"] == 2 and low["blocking"] == 1 and abs(low["sync_ms"] - 0.3) < 1e-9
    step = step_ops.per_step(low, high, 3)
    assert step["aten_ops"] == 2  # linear and its nested addmm; the one-time ops cancel
    assert step["by_name"]["aten::empty"] == 0
    assert step["launches"] == 1 and abs(step["gpu_ms"] - 2.0) < 1e-9
    assert abs(step["top_ms"] - 0.1) < 1e-9  # top-level only: the nested addmm is not counted twice
    assert step["blocking"] == 0 and abs(step["kernel_ms"]["gemm"] - 2.0) < 1e-9


def test_step_ops_table_names_what_changed_against_plain(tmp_path):
    import step_ops
    plain = step_ops.per_step(step_ops.trace_counts(_trace(tmp_path / "a.json", 1)),
                              step_ops.trace_counts(_trace(tmp_path / "b.json", 2)), 1)
    more = step_ops.per_step(step_ops.trace_counts(_trace(tmp_path / "c.json", 1)),
                             step_ops.trace_counts(_trace(tmp_path / "d.json", 3)), 1)  # two steps' work per step
    table = step_ops.format_rows({"plain": plain, "batched": more}, top=3)
    row = next(line for line in table.splitlines() if line.startswith("| batched"))
    assert "linear +1" in row and "addmm +1" in row and "gemm +2.00" in row


# -- py_profile: py-spy's collapsed stacks, restricted to the sampler ----------------------------

# Lines as `py-spy record --format raw --threads --idle` writes them (seen on this machine's Forge):
# "thread (tid): name;outermost frame;...;innermost frame count".
_SAMPLE = "thread (11): AnyIO worker;run (api.py:10);sample_euler (/w/k_diffusion/sampling.py:130)"
_RAW = f"""\
{_SAMPLE};forward (/w/dual.py:150) 60
{_SAMPLE};forward (/w/dual.py:150);forward (/w/dual.py:160) 30
thread (11): AnyIO worker;run (api.py:10);sample_euler (/w/k_diffusion/sampling.py:131) 10
thread (11): AnyIO worker;run (api.py:10);decode (vae.py:5) 500
thread (12): MainThread;serve (uvicorn.py:3) 900
"""


def test_py_profile_counts_only_the_samplers_samples_and_each_function_once_per_sample():
    import py_profile
    summary = py_profile.summarize(py_profile.parse_raw(_RAW))
    assert summary["samples"] == 100  # the VAE decode and the server thread are outside the sampler
    assert summary["self"]["forward (dual.py:150)"] == 60 and summary["self"]["forward (dual.py:160)"] == 30
    assert summary["self"]["sample_euler (sampling.py:131)"] == 10
    # total: `forward` recursing into itself is one sample, not two; run() above the sampler is cut off
    assert summary["total"]["forward (dual.py)"] == 90 and summary["total"]["sample_euler (sampling.py)"] == 100
    assert "run (api.py)" not in summary["total"]
    text = py_profile.format_summary(summary, rate=100, steps=2, top=3)
    assert "~500.0 ms per step" in text  # 100 samples at 100 Hz over 2 steps
    assert " 60.0 %   300.00 ms/step  forward (dual.py:150)" in text


def test_py_profile_says_so_when_no_sample_was_in_the_sampler():
    import py_profile
    summary = py_profile.summarize(py_profile.parse_raw(_RAW), within=r"^sample_heun ")
    assert summary["samples"] == 0
    assert "no samples inside the sampler" in py_profile.format_summary(summary, rate=100, steps=2)


def test_a_peak_without_a_reset_before_the_call_is_not_reported(monkeypatch):
    """Without the diagnostic reset route (a WebUI started without AUTOLORA_DIAGNOSTICS=1) the
    WebUI's peak is the process's since it started: the bench reports none rather than that one."""
    import base64
    answers = {"/sdapi/v1/txt2img": {"images": [base64.b64encode(b"png").decode()], "info": "{}"},
               "/sdapi/v1/memory": {"cuda": {"allocated": {"peak": 5 * 2 ** 30}}}}
    for reset, want in ((None, None), ({"ok": True}, 5 * 2 ** 30)):
        answers["/autolora/v1/reset-peak"] = reset
        monkeypatch.setattr(wb, "_http", lambda url, payload=None, timeout=0: answers[url.split("127.0.0.1:1")[1]])
        monkeypatch.setattr(wb, "_optional", lambda url, payload=None: answers[url.split("127.0.0.1:1")[1]])
        assert wb.run_one("http://127.0.0.1:1", {"prompt": "p"})[3] == want
