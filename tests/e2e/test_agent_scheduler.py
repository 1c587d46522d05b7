"""AutoLoRA beside ArtVentureX/sd-webui-agent-scheduler, on a real WebUI (SD1.5, 64x64, 4 steps).

The scheduler stores a queued API request and replays it later through the host's own API code
(`Api.text2imgapi`), `alwayson_scripts` included. A request queued with AutoLoRA must give the
image the same request gives through `/sdapi/v1/txt2img` (same seed), and AutoLoRA must have run
in the queued task: a generation of its own in `/autolora/v1/stats` with the same guided steps and
base-branch evaluations, and the AutoLoRA keys in the task's infotext. The WebUI's defaults as in
test_sd15.py: empty negative prompt, CFG 7, the UI's sampler, `<lora:name:1>`. A queued request with
a bad AutoLoRA value (which `/sdapi/v1/txt2img` answers with 422) runs without AutoLoRA: the plain
LoRA image, no AutoLoRA generation, no AutoLoRA keys in its infotext, the reason in the WebUI's log.

The extension: AUTOLORA_E2E_AGENT_SCHEDULER (tests/e2e/install/extension.sh agent-scheduler WEBUI),
or a copy installed in the WebUI's extensions/ (extensions.py).
"""
from __future__ import annotations

import base64
import re
import time

import pytest

from extensions import AGENT_SCHEDULER, start_with, stop
from webui import Result, assert_close, assert_differs, assert_drawn, diff, with_autolora

ARCH = "sd15"
STEPS = 4
QUEUE_TIMEOUT = 600  # seconds a queued 4-step 64x64 task may take on a CPU
REFUSED = "AutoLoRA: 'gamma' must be between"  # the script's message for the bad value below


@pytest.fixture(scope="module")
def webui(pool, host, tmp_path_factory):
    data = tmp_path_factory.mktemp("agent-scheduler")
    # The scheduler's task database in a temporary folder, not in the extension's checkout.
    server, client = start_with(pool, host, AGENT_SCHEDULER,
                                ("--agent-scheduler-sqlite-file", str(data / "task_scheduler.sqlite3")))
    try:
        # A queued task always saves its images (task_runner: save_images=True); they go here, and the
        # install's config.json is put back when the server stops.
        client.set_options({"outdir_samples": str(data / "outputs"), "samples_format": "png"})
    except BaseException:
        stop(server, client)
        raise
    yield client
    stop(server, client)


def base_req(webui, **kw):
    req = {"prompt": "a photo of a cat", "steps": STEPS, "width": 64, "height": 64, "cfg_scale": 7, "seed": 4242}
    req.update(webui.host.spec.archs[ARCH].ui_defaults)
    req.update(kw)
    return req


def lora_req(webui, **kw):
    req = base_req(webui, **kw)
    req["prompt"] += f" <lora:{webui.models['lora'].stem}:1>"
    return req


def autolora_fields(infotext: str) -> dict:
    return dict(re.findall(r"(AutoLoRA[^:,\n]*): ([^,\n]+)", infotext))


def queue(webui, kind: str, req: dict) -> Result:
    """Queue `req`, wait for the task to finish, return its image, infotext and the stats after it."""
    status, body = webui.post(f"/agent-scheduler/v1/queue/{kind}", req)
    assert status == 200 and body.get("task_id"), f"queueing failed: HTTP {status} {str(body)[:500]}"
    task_id = body["task_id"]
    deadline = time.time() + QUEUE_TIMEOUT
    while True:
        task = webui.get(f"/agent-scheduler/v1/task/{task_id}")
        assert task.get("success"), task
        state = task["data"]["status"]
        if state not in ("pending", "running"):
            break
        assert time.time() < deadline, f"task {task_id} still {state} after {QUEUE_TIMEOUT} s"
        time.sleep(1)
    assert state == "done", f"task {task_id} {state}: {str(task['data'].get('result'))[:800]}"
    results = webui.get(f"/agent-scheduler/v1/task/{task_id}/results")
    assert results.get("success") and len(results["data"]) == 1, str(results)[:500]
    image = results["data"][0]["image"]
    png = base64.b64decode(image.split(",", 1)[1] if image.startswith("data:") else image)
    return Result([png], {"infotexts": [results["data"][0]["infotext"]]}, webui.stats())


def test_a_queued_autolora_txt2img_is_the_direct_calls_image_and_autolora_ran_in_it(webui):
    req = with_autolora(lora_req(webui), {"enabled": True})
    plain = webui.txt2img(lora_req(webui))
    direct = webui.txt2img(req)
    assert_drawn(direct.image, "direct call")
    assert_differs(direct.image, plain.image, "γ 1.5 vs the plain LoRA image")
    st = direct.stats
    assert st["active"] and st["guided_steps"] >= STEPS and st["base_calls"] >= STEPS, st

    queued = queue(webui, "txt2img", req)
    assert diff(queued.image, direct.image) == (0.0, 0), "the queued task's image vs the direct call's"
    qs = queued.stats
    assert qs["generation"] == st["generation"] + 1, ("the queued task is AutoLoRA's next generation", qs)
    assert qs["active"] and qs["finished"] and qs["failure"] is None and not qs["notices"], qs
    for key in ("guided_steps", "plain_steps", "base_calls", "strategy", "guided_loras", "settings"):
        assert qs[key] == st[key], (key, qs[key], st[key])
    fields = autolora_fields(queued.infotext)
    assert fields.get("AutoLoRA") == "True" and "AutoLoRA version" in fields, queued.infotext
    assert fields == autolora_fields(direct.infotext), (queued.infotext, direct.infotext)


def test_a_queued_gamma_0_is_the_image_without_the_lora(webui):
    """The base branch inside the queued task: γ 0 gives the image of the prompt without the LoRA."""
    without = webui.txt2img(base_req(webui))
    queued = queue(webui, "txt2img", with_autolora(lora_req(webui), {"enabled": True, "gamma": 0.0}))
    assert_drawn(queued.image, "queued γ 0")
    assert_close(queued.image, without.image, "queued γ 0 vs the prompt without the LoRA tag")
    assert queued.stats["guided_steps"] >= STEPS and queued.stats["settings"]["gamma"] == 0.0, queued.stats
    assert autolora_fields(queued.infotext).get("AutoLoRA gamma") == "0", queued.infotext


def test_a_queued_task_with_a_bad_autolora_value_runs_without_autolora(webui):
    """The queue's route is not the host's: AutoLoRA's argument check (422 on /sdapi/v1/txt2img) does
    not see it. The task runs, the script refuses the value, and the image is the WebUI's own."""
    bad = with_autolora(lora_req(webui), {"enabled": True, "gamma": 1e30})
    status, body = webui.post("/sdapi/v1/txt2img", bad)
    assert status == 422 and "gamma" in str(body), (status, str(body)[:300])
    plain = webui.txt2img(lora_req(webui))
    before = webui.stats()
    said = webui.server.log_path.read_text(errors="replace").count(REFUSED)
    queued = queue(webui, "txt2img", bad)
    assert webui.server.log_path.read_text(errors="replace").count(REFUSED) == said + 1, \
        f"the WebUI's console says why the task ran without AutoLoRA ({REFUSED!r})"
    assert diff(queued.image, plain.image) == (0.0, 0), "the queued task with a refused value vs the plain LoRA image"
    assert queued.stats.get("generation", 0) == before.get("generation", 0), ("no AutoLoRA generation", queued.stats)
    assert not autolora_fields(queued.infotext), queued.infotext
