"""A small client for a running WebUI (host-neutral) and the image comparisons of the e2e suite."""
from __future__ import annotations

import base64
import copy
import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from hosts import get_json, post_json

# Tolerances of the identities (uint8 pixels, 0..255). Observed on CPU fp32: max 1, mean < 0.01.
IDENTITY_MEAN, IDENTITY_MAX = 0.5, 8
# "Differs": a clearly visible change (the random LoRA itself moves pixels by ~9/255 on average).
DIFFERS_MEAN = 1.0


@dataclass
class Result:
    pngs: list  # raw PNG bytes of every returned image
    info: dict
    stats: dict  # /autolora/v1/stats after the call

    @property
    def images(self) -> list:
        return [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).astype(np.int16) for b in self.pngs]

    @property
    def image(self):
        return self.images[0]

    @property
    def infotext(self) -> str:
        return self.info["infotexts"][0]


def diff(a, b) -> tuple:
    d = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    return float(d.mean()), int(d.max())


def assert_close(a, b, what=""):
    mean, mx = diff(a, b)
    assert mean <= IDENTITY_MEAN and mx <= IDENTITY_MAX, \
        f"{what}: mean |Δ| {mean:.3f}, max {mx} (tolerance {IDENTITY_MEAN}, {IDENTITY_MAX})"


def assert_drawn(image, what=""):
    """A real picture, not the black a NaN becomes: identities between two blank images prove nothing."""
    assert np.asarray(image).std() > 1, f"{what}: blank image"


def assert_differs(a, b, what=""):
    mean, _ = diff(a, b)
    assert mean >= DIFFERS_MEAN, f"{what}: mean |Δ| {mean:.3f} < {DIFFERS_MEAN}"


class WebUI:
    def __init__(self, url: str, host_name: str):
        self.url, self.host_name = url, host_name
        self._cache = {}
        self._options_before = {}
        self.reselect_after = ()  # HostSpec.reselect_after: options taken up only when a checkpoint is selected
        self.server = None

    # -- HTTP ------------------------------------------------------------------------------------
    def post(self, path, payload, timeout=1800):
        return post_json(self.url + path, payload, timeout)

    def get(self, path):
        return get_json(self.url + path)

    def stats(self) -> dict:
        return self.get("/autolora/v1/stats")

    def generate(self, kind: str, req: dict, *, cache: bool = False) -> Result:
        if kind == "txt2img" and (req.get("enable_hr") or "infotext" in req):
            req = {**getattr(self, "hires_fields", {}), **req}
        key = (kind, json.dumps(req, sort_keys=True))
        if cache and key in self._cache:
            return self._cache[key]
        status, body = self.post(f"/sdapi/v1/{kind}", req)
        assert status == 200, f"HTTP {status}: {str(body)[:800]}"
        result = Result([base64.b64decode(i) for i in body["images"]], json.loads(body["info"]), self.stats())
        if cache:
            self._cache[key] = result
        return result

    def txt2img(self, req, **kw) -> Result:
        return self.generate("txt2img", req, **kw)

    def img2img(self, req, **kw) -> Result:
        return self.generate("img2img", req, **kw)

    # -- options (every change is put back by restore_options) -------------------------------------
    def set_options(self, values: dict):
        current = self.get("/sdapi/v1/options")
        for key in values:
            self._options_before.setdefault(key, current.get(key))
        status, body = self.post("/sdapi/v1/options", values)
        assert status == 200, body
        self._reselect_if_needed(current, values)
        self._cache.clear()

    def restore_options(self):
        if self._options_before:
            current = self.get("/sdapi/v1/options")
            self.post("/sdapi/v1/options", self._options_before)
            self._reselect_if_needed(current, self._options_before)
            self._options_before = {}

    def _reselect_if_needed(self, before: dict, values: dict):
        if self.server is not None and any(k in self.reselect_after and before.get(k) != v for k, v in values.items()):
            self.server.reselect_checkpoint()


def with_autolora(req: dict, args) -> dict:
    out = copy.deepcopy(req)
    out["alwayson_scripts"] = {"AutoLoRA": {"args": args if isinstance(args, list) else [args]}}
    return out


def png_b64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
