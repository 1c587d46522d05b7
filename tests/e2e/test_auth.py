"""The extension's routes under the host's own API rules, on a real WebUI (SD1.5, 64x64).

With `--api-auth`, every AutoLoRA route and the argument check of txt2img answer an anonymous or
wrongly authenticated client exactly as the host's own `/sdapi/v1/options` does (401), and an
authenticated one as usual (200 / 422). With `--gradio-auth` alone the host leaves its API open,
and so do we. Memory probes exist only with AUTOLORA_DIAGNOSTICS set. Each case starts its own
server (the pool's is stopped first: one WebUI at a time)."""
from __future__ import annotations

import pytest

from hosts import Server, ensure_models, get_status, post_json

USER = ("autolora", "e2e-secret")
WRONG = ("autolora", "nope")
BAD_ARGS = {"enabled": True, "gamma": 1e30}


def _server(pool, host, extra_args, env=None, auth=None):
    pool.close()
    models = ensure_models(host, "sd15")
    server = Server(host, models["ckpt"], pool.log_dir, extra_args, env=env, auth=auth)
    server.start()
    return server, models


def _txt2img(models, args):
    return {"prompt": f"a photo of a cat <lora:{models['lora'].stem}:1>", "steps": 2, "width": 64, "height": 64,
            "seed": 3, "alwayson_scripts": {"AutoLoRA": {"args": [args]}}}


@pytest.fixture
def auth_server(pool, host):
    if host is None:
        pytest.skip("no WebUI configured")
    server, models = _server(pool, host, ("--api-auth", f"{USER[0]}:{USER[1]}"), auth=USER)
    yield server, models
    server.stop()


def test_with_api_auth_the_extension_answers_only_authenticated_clients(auth_server):
    server, models = auth_server
    url = server.url
    for who in (None, WRONG):
        assert get_status(f"{url}/sdapi/v1/options", who) == 401, "the host's own rule"
        for path in ("params", "stats", "residue"):
            assert get_status(f"{url}/autolora/v1/{path}", who) == 401, (path, who)
        assert get_status(f"{url}/autolora/v1/reset-peak", who, method="POST") == 401
        status, body = post_json(f"{url}/sdapi/v1/txt2img", _txt2img(models, BAD_ARGS), auth=who)
        assert status == 401 and "AutoLoRA" not in str(body), (who, status, body)
    for path in ("params", "stats", "residue"):
        assert get_status(f"{url}/autolora/v1/{path}", USER) == 200, path
    assert get_status(f"{url}/autolora/v1/reset-peak", USER, method="POST") == 200
    status, body = post_json(f"{url}/sdapi/v1/txt2img", _txt2img(models, BAD_ARGS), auth=USER)
    assert status == 422 and "'gamma' must be between -10 and 10" in str(body), (status, body)
    status, body = post_json(f"{url}/sdapi/v1/txt2img", _txt2img(models, {"enabled": True}), auth=USER)
    assert status == 200 and "AutoLoRA: True" in body["info"], str(body)[:300]


def test_with_gradio_auth_only_the_api_is_as_open_as_the_hosts_and_probes_are_off(pool, host):
    if host is None:
        pytest.skip("no WebUI configured")
    server, models = _server(pool, host, ("--gradio-auth", f"{USER[0]}:{USER[1]}"), env={"AUTOLORA_DIAGNOSTICS": ""})
    try:
        url = server.url
        assert get_status(f"{url}/sdapi/v1/options") == 200, "the host leaves its API open with --gradio-auth"
        assert get_status(f"{url}/autolora/v1/params") == 200 and get_status(f"{url}/autolora/v1/stats") == 200
        assert get_status(f"{url}/autolora/v1/residue") == 404, "memory probes only when turned on"
        assert get_status(f"{url}/autolora/v1/reset-peak", method="POST") in (404, 405)
        status, body = post_json(f"{url}/sdapi/v1/txt2img", _txt2img(models, BAD_ARGS))
        assert status == 422 and "'gamma' must be between" in str(body), (status, body)
    finally:
        server.stop()
