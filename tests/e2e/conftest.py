"""Fixtures of the e2e suite: one WebUI server at a time (SDXL needs the machine to itself), the
LoRA mode of the host, and the options changed through the API put back afterwards."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hosts import Server, configured_hosts, ensure_models, other_webui_processes  # noqa: E402
from webui import WebUI  # noqa: E402

HOSTS = configured_hosts()
NO_HOST = ("e2e: set AUTOLORA_A1111, AUTOLORA_FORGE, AUTOLORA_FORGE_NEO, AUTOLORA_REFORGE or AUTOLORA_FORGE_CLASSIC "
           "to a WebUI folder with launch.py to run the end-to-end suite")


def pytest_generate_tests(metafunc):
    if "host" in metafunc.fixturenames:
        params = HOSTS or [pytest.param(None, marks=pytest.mark.skip(reason=NO_HOST))]
        metafunc.parametrize("host", params, ids=lambda h: h.name if h else "none", scope="module")
    if "mode" in metafunc.fixturenames:
        modes = sorted({m for h in HOSTS for m in h.spec.lora_modes}) or ["none"]
        arch = getattr(metafunc.module, "ARCH", "sd15")
        if arch == "sdxl":
            modes = sorted({h.spec.sdxl_mode for h in HOSTS}) or ["none"]
        elif arch != "sd15":  # newer model families run in the merged LoRA mode only
            modes = ["merged"]
        metafunc.parametrize("mode", modes, scope="module")


class Pool:
    """At most one running server: asking for another arch stops the current one first."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.key, self.server, self.webui, self.models = None, None, None, None

    def get(self, host, arch):
        key = (host.name, arch)
        if self.key != key:
            self.close()
            models = ensure_models(host, arch)
            server = Server(host, models["ckpt"], self.log_dir, host.spec.archs[arch].args)
            self.key, self.server, self.models = key, server, models
            server.start()
            self.webui = WebUI(server.url, host.name)
            self.webui.hires_fields = dict(host.spec.hires_fields)
            self.webui.hr_upscaler = host.spec.hr_upscaler
            self.webui.tells_loras_apart = host.spec.tells_loras_apart
            self.webui.reselect_after = tuple(host.spec.reselect_after)
            self.webui.server = server
            self.webui.models = models
            self.webui.set_options(host.spec.archs[arch].options) if host.spec.archs[arch].options else None
        return self.webui

    def close(self):
        if self.server is not None:
            try:
                if self.webui is not None:
                    self.webui.restore_options()
            finally:
                self.server.stop()
        self.key = self.server = self.webui = self.models = None


def _interrupt_on_sigterm(signum, frame):
    # A SIGTERM (a job runner, `timeout`) becomes a KeyboardInterrupt, so that pytest still tears the
    # session down: the server is stopped and the install's options and config files are put back.
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def pool(tmp_path_factory):
    import signal
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    log_dir = os.environ.get("AUTOLORA_E2E_LOGS")
    log_dir = tmp_path_factory.mktemp("webui-logs") if not log_dir else log_dir
    os.makedirs(log_dir, exist_ok=True)
    p = Pool(__import__("pathlib").Path(log_dir))
    yield p
    p.close()


@pytest.fixture(scope="module")
def webui(pool, host, mode, request):
    if host is None:
        pytest.skip(NO_HOST)
    if not host.spec.supported:
        pytest.skip(f"AutoLoRA does not support {host.name}: test_unsupported_host.py checks that it says so")
    arch = getattr(request.module, "ARCH", "sd15")
    if arch not in host.spec.archs:
        pytest.skip(f"the suite has no {arch} model for {host.name}")
    if mode not in host.spec.lora_modes:
        pytest.skip(f"{host.name} has no LoRA mode {mode!r}")
    if arch == "sdxl":
        if mode != host.spec.sdxl_mode:
            pytest.skip(f"SDXL runs in {host.spec.sdxl_mode} mode on {host.name}")
        others = [p for p in other_webui_processes() if not (pool.server and pool.server.proc and
                                                              p[0] == pool.server.proc.pid)]
        if others and not os.environ.get("AUTOLORA_E2E_ALLOW_SHARED_SDXL"):
            pool.close()
            others = [p for p in other_webui_processes()]
            if others:
                pytest.skip(f"SDXL needs the machine to itself; other WebUI processes: {others}")
    try:
        client = pool.get(host, arch)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    if getattr(client, "mode", None) not in (None, mode):
        # A1111 keeps a merged LoRA in the weights after a generation and puts them back only at
        # the next generation in merged mode: in functional mode a request without LoRAs returns
        # early (networks.network_forward) and would still see the merged weights. So one plain
        # request in the old mode first, as a user would have to before switching modes.
        client.txt2img({"prompt": "a photo of a cat", "steps": 1, "width": 64, "height": 64, "seed": 1})
    client.set_options(host.spec.lora_modes[mode])
    client.mode = mode
    client.host = host
    return client
