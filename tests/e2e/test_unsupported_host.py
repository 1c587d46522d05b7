"""On a WebUI AutoLoRA cannot bind to (one whose backend lacks what the binding reads), it is
honest: the accordion says it is not available and why, the API refuses an enabled request with that
reason (HTTP 422), a disabled request and plain generation are the WebUI's own images byte for byte,
and no image claims AutoLoRA. Every WebUI the suite installs is supported now and skips this module
(its own suite runs instead); the refusal itself runs on stand-ins of a host the binding cannot carry
(tests/test_adapter_lifecycle.py, tests/test_api.py). A HostSpec with supported=False runs it."""
from __future__ import annotations

import json

import pytest

from hosts import Server, ensure_models, get_json, post_json

NOT_AVAILABLE = "AutoLoRA is not available on this WebUI:"


@pytest.fixture(scope="module")
def server(pool, host):
    if host is None:
        pytest.skip("no WebUI configured")
    if host.spec.supported:
        pytest.skip(f"{host.name} is supported: its own suite runs")
    pool.close()
    models = ensure_models(host, "sd15")
    server = Server(host, models["ckpt"], pool.log_dir)
    server.start()
    yield server, models
    server.stop()


def _req(models, args=None, lora=True):
    req = {"prompt": "a photo of a cat" + (f" <lora:{models['lora'].stem}:1>" if lora else ""), "negative_prompt": "",
           "steps": 3, "width": 64, "height": 64, "cfg_scale": 7, "seed": 11, "sampler_name": "Euler a"}
    if args is not None:
        req["alwayson_scripts"] = {"AutoLoRA": {"args": [args]}}
    return req


def test_the_accordion_says_autolora_is_not_available_and_why(server):
    srv, _ = server
    config = json.dumps(get_json(f"{srv.url}/config"))
    assert "AutoLoRA (not available on this WebUI)" in config
    assert NOT_AVAILABLE in config and "autolora_txt2img_unavailable" in config


def test_an_enabled_request_is_refused_with_the_reason_and_nothing_claims_autolora(server):
    srv, models = server
    status, body = post_json(f"{srv.url}/sdapi/v1/txt2img", _req(models, {"enabled": True, "gamma": 1.5}))
    assert status == 422 and str(body.get("detail", "")).startswith(NOT_AVAILABLE), (status, body)
    plain_status, plain = post_json(f"{srv.url}/sdapi/v1/txt2img", _req(models))
    off_status, off = post_json(f"{srv.url}/sdapi/v1/txt2img", _req(models, {"enabled": False, "gamma": 3.0}))
    assert plain_status == off_status == 200
    assert off["images"][0] == plain["images"][0], "disabled: the WebUI's own image"
    assert "AutoLoRA" not in off["info"] and "AutoLoRA" not in plain["info"]
    stats = get_json(f"{srv.url}/autolora/v1/stats")
    assert stats.get("generation", 0) == 0 or not stats.get("guided_steps"), stats
