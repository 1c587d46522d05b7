"""The extension's HTTP surface on a real FastAPI app: the argument check of txt2img/img2img
(HTTP 422 with a message, only for requests the host authenticated) and the extension's routes,
which take the host's own API authentication; diagnostics routes only when turned on.

`StandInHostApi` copies what A1111 v1.10.1 and Forge do in modules/api/api.py: `Api.__init__`
reads `--api-auth` ("user:pass,user2:pass2") and `add_api_route` puts `Depends(self.auth)` on every
route when it is set; `auth` is HTTP Basic with `compare_digest`, 401 otherwise. Its txt2img
endpoint takes a request model with a free `alwayson_scripts` dict, as the hosts' do.
"""
from __future__ import annotations

import base64
from secrets import compare_digest

import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from fastapi.testclient import TestClient
from pydantic import BaseModel

from lib_autolora import diagnostics as diagnostics_module
from lib_autolora import params
from lib_autolora import api_args
from lib_autolora.hosts import http


class StandInTxt2ImgRequest(BaseModel):
    prompt: str = ""
    alwayson_scripts: dict = {}
    styles: list = []


class StandInHostApi:
    def __init__(self, app: FastAPI, api_auth: str = ""):
        self.app, self.api_auth, self.received = app, api_auth, []
        if api_auth:
            self.credentials = dict(a.split(":") for a in api_auth.split(","))
        self.add_api_route("/sdapi/v1/txt2img", self.txt2img, methods=["POST"])
        self.add_api_route("/sdapi/v1/img2img", self.txt2img, methods=["POST"])
        self.add_api_route("/sdapi/v1/options", lambda: {"ok": True}, methods=["GET"])

    def add_api_route(self, path, endpoint, **kwargs):
        if self.api_auth:
            return self.app.add_api_route(path, endpoint, dependencies=[Depends(self.auth)], **kwargs)
        return self.app.add_api_route(path, endpoint, **kwargs)

    def auth(self, credentials: HTTPBasicCredentials = Depends(HTTPBasic())):
        if credentials.username in self.credentials:
            if compare_digest(credentials.password, self.credentials[credentials.username]):
                return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    def txt2img(self, req: StandInTxt2ImgRequest):
        self.received.append(req.alwayson_scripts)
        return {"images": []}


def client(api_auth="", diagnostics=False, monkeypatch=None, with_api=True):
    app = FastAPI()
    host = StandInHostApi(app, api_auth) if with_api else None
    resets, extra = [], ()
    if diagnostics:  # what scripts/autolora.py adds with AUTOLORA_DIAGNOSTICS=1
        monkeypatch.setattr(diagnostics_module, "reset_peak", lambda: resets.append(1))
        extra = tuple(diagnostics_module.routes(lambda: {"module_hooks": 0}))
    added = http.install(app, stats=lambda: {"generation": 7, "guided_loras": ["secret_style"]},
                         params_table=params.table_json, extra_routes=extra)
    return TestClient(app), host, added, resets


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


REQ = {"prompt": "a cat <lora:style:1>"}


def with_args(args):
    return dict(REQ, alwayson_scripts={"AutoLoRA": {"args": args}})


# -- the argument check ------------------------------------------------------------------------------

@pytest.mark.parametrize("entry,message", [
    ({"args": [{"enabled": True, "gama": 1}]}, "unknown argument"),
    ({"args": [True, float("nan")]}, "finite"),
    ({"args": [True, 1.5, -2]}, "'w1' must be between 0 and 30 (or -1 for the generation's CFG scale), got -2"),
    ({"args": [True, 1e30]}, "'gamma' must be between -10 and 10, got 1e+30"),
    ({"args": [0] * (len(params.ARG_ORDER) + len(params.UNSET_BOXES) + 1)}, f"at most {len(params.ARG_ORDER)}"),
    ({"args": [{"enabled": True, "guided_loras": "other"}]}, "'other' not in the prompt"),
    ({"args": "yes"}, "must be a list"),
    ({"args": [True, {"gamma": 2}]}, "first slot"),
    ({"arg": [True]}, "takes only \"args\""),
    ([True], "must be an object"),
])
def test_bad_entries_have_clear_messages(entry, message):
    body = dict(REQ, alwayson_scripts={"autolora": entry})
    error = api_args.check_and_normalize(body)
    assert error is not None and message in error


def test_good_entries_pass_and_become_one_object_of_named_args():
    """Positional args become named ones: the host fills the slots after a client's positional args
    with the UI's values, among them the UI's "unset" boxes, which must not override the client."""
    assert api_args.check_and_normalize(dict(REQ)) is None
    body = with_args([True, 2.0, 3.5])
    assert api_args.check_and_normalize(body) is None
    named = body["alwayson_scripts"]["AutoLoRA"]["args"]
    assert params.settings_from_args(named + params.ui_values(params.AutoLoraSettings())[1:]) == \
        params.AutoLoraSettings(enabled=True, gamma=2.0, w1=3.5)
    body = dict(REQ, alwayson_scripts={"AutoLoRA": {"args": {"enabled": True}}})
    assert api_args.check_and_normalize(body) is None
    assert body["alwayson_scripts"]["AutoLoRA"]["args"] == [params.as_dict(params.AutoLoraSettings(enabled=True))]
    # styles can add LoRAs: their names are checked when the batch starts instead
    assert api_args.check_and_normalize(dict(REQ, styles=["s"], alwayson_scripts={"AutoLoRA": {"args": [
        {"enabled": True, "guided_loras": "from_style"}]}})) is None


def test_generation_routes_answer_422_before_the_host_runs_and_pass_good_requests_rewritten(monkeypatch):
    c, host, _, _ = client(monkeypatch=monkeypatch)
    r = c.post("/sdapi/v1/txt2img", json=with_args([True, "x"]))
    assert r.status_code == 422 and "'gamma' must be a number" in r.json()["detail"] and not host.received
    r = c.post("/sdapi/v1/img2img", json=dict(REQ, alwayson_scripts={"AutoLoRA": {"args": {"enabled": True}}}))
    assert r.status_code == 200 and host.received == [
        {"AutoLoRA": {"args": [params.as_dict(params.AutoLoraSettings(enabled=True))]}}]
    r = c.post("/sdapi/v1/txt2img", json=REQ)  # without AutoLoRA: untouched
    assert r.status_code == 200 and host.received[-1] == {}


def test_with_api_auth_every_route_needs_the_hosts_credentials_and_401_comes_before_422(monkeypatch):
    c, host, added, resets = client(api_auth="user:pass,other:word", diagnostics=True, monkeypatch=monkeypatch)
    assert set(added) == {"/autolora/v1/params", "/autolora/v1/stats", "/autolora/v1/residue", "/autolora/v1/reset-peak"}
    bad = with_args([True, 1e30])
    for creds in ({}, basic("user", "wrong"), basic("nobody", "pass")):
        assert c.get("/sdapi/v1/options", headers=creds).status_code == 401  # the host's own rule
        for path in ("/autolora/v1/params", "/autolora/v1/stats", "/autolora/v1/residue"):
            assert c.get(path, headers=creds).status_code == 401, (path, creds)
        assert c.post("/autolora/v1/reset-peak", headers=creds).status_code == 401
        r = c.post("/sdapi/v1/txt2img", json=bad, headers=creds)
        assert r.status_code == 401 and "AutoLoRA" not in r.text, "an anonymous client learns nothing of the args"
    assert not resets and not host.received
    ok = basic("other", "word")
    assert c.get("/autolora/v1/stats", headers=ok).json()["guided_loras"] == ["secret_style"]
    assert c.get("/autolora/v1/params", headers=ok).json()["arg_order"] == list(params.ARG_ORDER)
    assert c.post("/autolora/v1/reset-peak", headers=ok).json() == {"ok": True} and resets == [1]
    r = c.post("/sdapi/v1/txt2img", json=bad, headers=ok)
    assert r.status_code == 422 and "'gamma' must be between -10 and 10" in r.json()["detail"]


def test_without_api_auth_the_routes_are_as_open_as_the_hosts_and_diagnostics_only_when_turned_on(monkeypatch):
    c, _, added, _ = client(monkeypatch=monkeypatch)
    assert added == ["/autolora/v1/params", "/autolora/v1/stats"]
    assert c.get("/sdapi/v1/options").status_code == 200 and c.get("/autolora/v1/stats").status_code == 200
    assert c.get("/autolora/v1/residue").status_code == 404 and c.post("/autolora/v1/reset-peak").status_code in (404, 405)
    c, _, added, _ = client(diagnostics=True, monkeypatch=monkeypatch)
    assert c.get("/autolora/v1/residue").json() == {"module_hooks": 0}


def test_no_host_api_no_routes(monkeypatch):
    """A WebUI started without --api serves no API; the extension adds nothing either."""
    c, _, added, _ = client(monkeypatch=monkeypatch, with_api=False)
    assert added == [] and c.get("/autolora/v1/stats").status_code == 404


def test_installing_twice_adds_nothing_twice(monkeypatch):
    app = FastAPI()
    StandInHostApi(app)
    first = http.install(app, stats=lambda: {}, params_table=params.table_json)
    assert http.install(app, stats=lambda: {}, params_table=params.table_json) == []
    route = next(r for r in app.routes if getattr(r, "path", None) == "/sdapi/v1/txt2img")
    checks = [d for d in route.dependant.dependencies if getattr(d.call, http.CHECK_MARK, False)]
    assert first and len(checks) == 1


def test_on_a_webui_without_what_autolora_needs_an_enabled_request_is_refused_with_the_reason(monkeypatch):
    app = FastAPI()
    host = StandInHostApi(app)
    http.install(app, stats=lambda: {}, params_table=params.table_json,
                 unavailable="its CFG denoiser samples through its own backend (sampling_function)")
    c = TestClient(app)
    r = c.post("/sdapi/v1/txt2img", json=with_args([{"enabled": True}]))
    assert r.status_code == 422 and r.json()["detail"] == (
        "AutoLoRA is not available on this WebUI: its CFG denoiser samples through its own backend (sampling_function)")
    assert c.post("/sdapi/v1/txt2img", json=with_args([{"enabled": False}])).status_code == 200
    assert c.post("/sdapi/v1/txt2img", json=REQ).status_code == 200 and len(host.received) == 2
