"""Other WebUI extensions the e2e suite runs beside AutoLoRA (test_agent_scheduler.py, test_adetailer.py).

An extension is taken from the folder its environment variable names (a checkout made by
`tests/e2e/install/extension.sh NAME WEBUI`, which also installs its Python requirements into the
WebUI's venv), else from the WebUI's `extensions/` where a user would have installed it; without
either, its tests skip and say so. A checkout from the variable is linked into `extensions/` for
the test's own server only (`hosts.Server(extensions=...)`), so other runs on the same WebUI do not
load it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from hosts import Server, ensure_models, get_status
from webui import WebUI


@dataclass(frozen=True)
class Extension:
    key: str  # tests/e2e/install/extension.sh's NAME
    folder: str  # its folder name in extensions/ (the repository's name)
    repo: str  # owner/name on GitHub
    env_var: str  # the checkout to use
    marker: str  # a file only this extension has, relative to its folder
    route: str  # a GET route its API answers once the extension loaded

    def installed(self, webui_root: Path) -> list:
        folder = Path(webui_root) / "extensions"
        return [c for c in sorted(folder.iterdir()) if (c / self.marker).exists()] if folder.is_dir() else []

    def find(self, webui_root: Path) -> Optional[Path]:
        configured = os.environ.get(self.env_var)
        installed = self.installed(webui_root)
        if configured:
            path = Path(configured).resolve()
            others = [c for c in installed if c.resolve() != path]
            if others:
                pytest.skip(f"{self.env_var}={configured}, and another copy of {self.repo} is installed at "
                            f"{others[0]}: the WebUI would load both")
            return path if (path / self.marker).exists() else None
        return installed[0].resolve() if installed else None

    def missing(self, webui_root: Path) -> str:
        configured = os.environ.get(self.env_var)
        if configured:
            return f"{self.env_var}={configured} is not a checkout of {self.repo} (no {self.marker})"
        return (f"{self.repo} is not installed in {webui_root}/extensions: run tests/e2e/install/extension.sh "
                f"{self.key} {webui_root} and set {self.env_var} to the folder it prints")


AGENT_SCHEDULER = Extension("agent-scheduler", "sd-webui-agent-scheduler", "ArtVentureX/sd-webui-agent-scheduler",
                            "AUTOLORA_E2E_AGENT_SCHEDULER", "agent_scheduler/task_runner.py",
                            "/agent-scheduler/v1/queue")
ADETAILER = Extension("adetailer", "adetailer", "Bing-su/adetailer", "AUTOLORA_E2E_ADETAILER",
                      "adetailer/mediapipe.py", "/adetailer/v1/version")


def load_errors(server: Server, ext: Extension) -> str:
    """The WebUI's log lines about the extension's scripts failing to load (its traceback's last lines)."""
    try:
        lines = server.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    out = []
    for i, line in enumerate(lines):
        if "Error loading script" in line or "Error executing callback" in line or "Error calling" in line:
            block = lines[i:i + 40]
            end = next((j for j, b in enumerate(block[1:], 1) if re.match(r"^\S", b) and "Error" not in b[:8]), 40)
            out.append("\n".join(block[:end][-8:]))
    return "\n---\n".join(out)


def start_with(pool, host, ext: Extension, extra_args: tuple = (), env: Optional[dict] = None):
    """A server of `host` (SD1.5, its merged LoRA mode) running `ext` beside AutoLoRA, and its client.
    The pool's server is stopped first: one WebUI at a time. Fails with the WebUI's own error when the
    extension is there but did not load."""
    if host is None:
        pytest.skip("e2e: no WebUI configured")
    if not host.spec.supported:
        pytest.skip(f"AutoLoRA does not support {host.name}")
    source = ext.find(host.root)
    if source is None:
        pytest.skip(ext.missing(host.root))
    pool.close()
    models = ensure_models(host, "sd15")
    installed = any(c.resolve() == source for c in ext.installed(host.root))  # else linked in for this server
    server = Server(host, models["ckpt"], pool.log_dir, extra_args, env=env,
                    extensions={} if installed else {ext.folder: source})
    server.start()
    client = WebUI(server.url, host.name)
    client.hires_fields = dict(host.spec.hires_fields)
    client.reselect_after = tuple(host.spec.reselect_after)
    client.server, client.models, client.host, client.mode = server, models, host, "merged"
    try:
        if get_status(server.url + ext.route) != 200:
            errors = load_errors(server, ext) or server.log_tail()
            pytest.fail(f"{ext.repo} did not load on {host.spec.label or host.name} "
                        f"({ext.route} is not served); the WebUI's log:\n{errors}", pytrace=False)
        client.set_options(host.spec.lora_modes["merged"])
    except BaseException:
        server.stop()
        raise
    return server, client


def stop(server: Server, client: WebUI):
    try:
        client.restore_options()
    finally:
        server.stop()
