"""Host-neutral glue shared by the A1111 and Forge adapters and the AlwaysOn script.

Nothing here imports WebUI code: A1111 and Forge share the same `modules.*` layout for what this
module touches (the processing object `p`, the X/Y/Z plot script, the FastAPI app), and each piece
takes what it needs as an argument, so the hermetic tests drive it with stand-ins.

- prompts: the `<lora:name:...>` tags of a prompt, and which loaded LoRAs are guided
- API: validation of `alwayson_scripts["AutoLoRA"]` before the host runs the request (the hosts'
  script runner logs and swallows exceptions, so a bad value would otherwise be ignored silently)
- settings of one generation: UI/API args with the X/Y/Z overrides applied, and the infotext
- X/Y/Z axes built from `params.XYZ_PARAMS`
- diagnostics: the last generation's counters, served at `/autolora/v1/stats`, and what is
  registered in the host right now (callbacks, module hooks, open runs, process memory and live
  tensors, lib_autolora/memory_probe.py), served at
  `/autolora/v1/residue` for the soak test
"""
from __future__ import annotations

import gc
import json
import logging
import re
import threading
import time
from typing import Iterable, Optional, Sequence

from .. import memory_probe, params
from ..params import AutoLoraArgumentError, AutoLoraSettings

log = logging.getLogger("autolora")
SCRIPT_TITLE = "AutoLoRA"
API_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")
ROUTE_PREFIX = "/autolora/v1"

# -- prompts ----------------------------------------------------------------------------------------

# The extra-network syntax both hosts parse: <lora:name>, <lora:name:0.8>, <lora:name:te=1:unet=0.5>.
LORA_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)(?::[^>]*)?>", re.IGNORECASE)


def lora_names_in_prompt(*prompts) -> list:
    """Names of the LoRAs the prompts mention, in order of first appearance."""
    names = []
    for prompt in prompts:
        texts = prompt if isinstance(prompt, (list, tuple)) else [prompt]
        for text in texts:
            if not isinstance(text, str):
                continue
            for name in LORA_TAG.findall(text):
                name = name.strip()
                if name and name not in names:
                    names.append(name)
    return names


def select_guided(loaded: Sequence[tuple], requested: Sequence[str]) -> list:
    """Which loaded LoRAs the base branch removes.

    `loaded`: (key, names...) per LoRA the host activated, where names are every name the user may
    write for it (the name in the prompt, the file name, the alias). Empty `requested` guides all.
    Returns the keys of the guided LoRAs; an unknown name raises AutoLoraArgumentError.
    """
    if not requested:
        return [entry[0] for entry in loaded]
    guided, unknown = [], []
    for name in requested:
        hits = [entry[0] for entry in loaded if name in entry[1:] or name.lower() in
                {n.lower() for n in entry[1:] if isinstance(n, str)}]
        if not hits:
            unknown.append(name)
        for key in hits:
            if key not in guided:
                guided.append(key)
    if unknown:
        in_prompt = ", ".join(str(entry[1]) for entry in loaded) or "none"
        raise AutoLoraArgumentError(
            f"AutoLoRA: guided LoRA(s) {', '.join(map(repr, unknown))} not in the prompt; "
            f"the prompt's LoRAs: {in_prompt}")
    return guided


# -- settings of one generation -----------------------------------------------------------------------

OVERRIDES_ATTR = "autolora_overrides"  # set on `p` by the X/Y/Z axes


def settings_for(p, args) -> AutoLoraSettings:
    """The script's args with the X/Y/Z overrides stored on `p` applied over them."""
    settings = params.settings_from_args(args)
    overrides = getattr(p, OVERRIDES_ATTR, None) or {}
    if overrides:
        settings = settings.with_overrides(overrides)
        if settings.start > settings.end:
            raise AutoLoraArgumentError(
                f"AutoLoRA: 'start' ({settings.start}) must not exceed 'end' ({settings.end})")
    return settings


def mark_active(p, settings: AutoLoraSettings) -> None:
    """Adapters call this once guidance is set up for `p`: writes every setting to the infotext."""
    p.extra_generation_params.update(params.infotext_fields(settings))


def mark_inactive(p) -> None:
    """Guidance was set up but then failed: the infotext must not claim it ran."""
    for param in params.PARAMS:
        p.extra_generation_params.pop(param.infotext, None)
    if DIAGNOSTICS.last:
        DIAGNOSTICS.last["active"] = False


# -- API validation ---------------------------------------------------------------------------------

def _script_entry(alwayson: dict):
    for key, value in alwayson.items():
        if isinstance(key, str) and key.lower() == SCRIPT_TITLE.lower():
            return key, value
    return None, None


def validate_request(body) -> tuple:
    """Check a txt2img/img2img request body before the host runs it.

    Returns (error message or None, rewritten body or None). The one rewrite: `"args": {...}` (a
    single dict of named args) becomes `"args": [{...}]`, the form the hosts pass to the script.
    """
    if not isinstance(body, dict):
        return None, None
    alwayson = body.get("alwayson_scripts")
    if not isinstance(alwayson, dict):
        return None, None
    key, entry = _script_entry(alwayson)
    if key is None:
        return None, None
    if not isinstance(entry, dict):
        return (f"AutoLoRA: alwayson_scripts.{key} must be an object like {{\"args\": [...]}}, "
                f"got {type(entry).__name__}"), None
    unknown_keys = sorted(set(entry) - {"args"})
    if unknown_keys:
        return f"AutoLoRA: alwayson_scripts.{key} takes only \"args\", got {', '.join(unknown_keys)}", None
    args = entry.get("args", [])
    rewritten = None
    if isinstance(args, dict):
        args = [args]
        rewritten = dict(body, alwayson_scripts=dict(alwayson, **{key: dict(entry, args=args)}))
    if not isinstance(args, list):
        return (f"AutoLoRA: alwayson_scripts.{key}.args must be a list of positional args "
                f"({', '.join(params.ARG_ORDER)}) or one object of named args; got {type(args).__name__}"), None
    if any(isinstance(a, dict) for a in args[1:]):
        return "AutoLoRA: named args go in one object in the first slot of args", None
    try:
        settings = params.settings_from_args(args)
    except AutoLoraArgumentError as exc:
        return str(exc), None
    if settings.enabled and settings.guided_loras and not body.get("styles"):
        # Styles may add LoRAs to the prompt; with styles the check happens when the batch starts.
        in_prompt = lora_names_in_prompt(body.get("prompt"), body.get("hr_prompt"))
        lower = {n.lower() for n in in_prompt}
        unknown = [n for n in settings.guided_loras if n.lower() not in lower]
        if unknown:
            return (f"AutoLoRA: guided LoRA(s) {', '.join(map(repr, unknown))} not in the prompt; "
                    f"the prompt's LoRAs: {', '.join(in_prompt) or 'none'}"), None
    return None, rewritten


class ApiValidationMiddleware:
    """ASGI middleware: answers 422 with a clear message for bad AutoLoRA args in the generation
    endpoints, before the host's worker runs them. Every other request passes untouched."""

    def __init__(self, app, paths: Iterable[str] = API_PATHS):
        self.app = app
        self.paths = tuple(paths)

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST" or \
                not any(scope.get("path", "").endswith(path) for path in self.paths):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            error, rewritten = validate_request(json.loads(body or b"null"))
        except ValueError:  # not JSON: the host answers that itself
            error, rewritten = None, None
        if error is not None:
            payload = json.dumps({"error": "AutoLoraArgumentError", "detail": error, "errors": error}).encode()
            await send({"type": "http.response.start", "status": 422,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        if rewritten is not None:
            body = json.dumps(rewritten).encode()
            scope = dict(scope, headers=[(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
                         + [(b"content-length", str(len(body)).encode())])
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def install_api_validation(app) -> None:
    """Add the middleware to a FastAPI/Starlette app (from an on_app_started callback)."""
    if any(getattr(m, "cls", None) is ApiValidationMiddleware for m in getattr(app, "user_middleware", [])):
        return
    # Starlette builds its middleware stack on the first request; the hosts add theirs at startup
    # and reset the stack the same way (A1111: initialize_util.setup_middleware).
    app.middleware_stack = None
    app.add_middleware(ApiValidationMiddleware)


# -- diagnostics ------------------------------------------------------------------------------------

class GcClock:
    """Time the Python garbage collector has run in this process, and its full collections
    (gc.callbacks; installed once, never removed, so nothing is left behind by an interrupted
    generation). A full collection in a WebUI's heap takes a noticeable share of a second; the
    stats say how much of a generation went there, which per-step timings alone cannot."""

    def __init__(self):
        self.seconds = 0.0
        self.full = 0
        self._t0 = None

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None
            if info.get("generation") == 2:
                self.full += 1

    def reading(self) -> tuple:
        return self.seconds, self.full


GC_CLOCK = GcClock()


class Diagnostics:
    """Counters of the last AutoLoRA generation, for users, the e2e suite and the benchmark.

    Served as JSON at /autolora/v1/stats; nothing of it goes into images or infotexts."""

    def __init__(self):
        self._lock = threading.Lock()
        self.generations = 0
        self.last: dict = {}
        self._gc_at_begin = GC_CLOCK.reading()

    def begin(self, host: str, settings: AutoLoraSettings) -> dict:
        record = {"generation": None, "host": host, "started": time.time(), "active": False,
                  "settings": settings_dict(settings), "strategy": None, "strategy_reason": None,
                  "weights_merged": None, "guided_loras": [], "base_calls": 0, "guided_steps": 0,
                  "plain_steps": 0, "te_base_encodes": 0, "te_base_cached": 0, "modules": {"text_encoder": 0, "unet": 0},
                  "notices": [], "peak_vram_bytes": None, "strategy_setup_ms": None,
                  "gc_ms": None, "gc_full_collections": None}
        GC_CLOCK.install()
        with self._lock:
            self.generations += 1
            record["generation"] = self.generations
            self.last = record
            self._gc_at_begin = GC_CLOCK.reading()
        return record

    def end(self, record: dict) -> None:
        """What the garbage collector took since `begin` (the host's own work included)."""
        seconds, full = GC_CLOCK.reading()
        seconds0, full0 = self._gc_at_begin
        record["gc_ms"] = round(1000.0 * (seconds - seconds0), 1)
        record["gc_full_collections"] = full - full0

    def snapshot(self) -> dict:
        with self._lock:
            return json.loads(json.dumps(self.last, default=str)) if self.last else {"generation": 0}


DIAGNOSTICS = Diagnostics()


def enter_strategy(strategy, record: dict):
    """`strategy.__enter__()`, its wall time added to the record's `strategy_setup_ms` (every
    pass of a generation, hires too, enters its own)."""
    started = time.perf_counter()
    entered = strategy.__enter__()
    record["strategy_setup_ms"] = round(1000.0 * (time.perf_counter() - started)
                                        + (record.get("strategy_setup_ms") or 0), 1)
    return entered


def note_once(notices: list, record: dict, text: str, p=None) -> None:
    """A notice of one generation, given once: in its stats record, the log, and (with `p`) the
    infotext's comments, where users see it under the image."""
    if text in notices:
        return
    notices.append(text)
    record["notices"].append(text)
    log.warning(text)
    if p is not None:
        p.comment(text)


def settings_dict(settings: AutoLoraSettings) -> dict:
    return {p.name: (list(v) if isinstance(v := getattr(settings, p.name), tuple) else v) for p in params.PARAMS}


def params_table() -> dict:
    """The parameter table as JSON: the API's positional order, ranges, tooltips (javascript/)."""
    return {"title": SCRIPT_TITLE, "arg_order": list(params.ARG_ORDER), "follow_cfg": params.FOLLOW_CFG,
            "params": [{"name": p.name, "kind": p.kind, "default": p.default, "label": p.label,
                        "tooltip": p.tooltip, "infotext": p.infotext, "minimum": p.minimum,
                        "maximum": p.maximum, "step": p.step, "choices": list(p.choices),
                        "xyz": p.xyz, "advanced": p.advanced} for p in params.PARAMS]}


def elem_id(tab: str, name: str) -> str:
    """DOM id of a control; javascript/autolora.js finds the controls by it."""
    return f"autolora_{tab}_{name}"


def residue_counts(callback_map: dict, module_roots: Iterable, extra: Optional[dict] = None) -> dict:
    """What is registered in the host now: callbacks per list of the host's `script_callbacks`
    (ours counted apart, by the `autolora` name or script path), forward (pre-)hooks on every module
    of the model, and the adapter's own open state. Between generations, a clean extension leaves
    these exactly as they were before its first generation."""
    callbacks, ours = {}, 0
    for name, entries in callback_map.items():
        callbacks[name] = len(entries)
        for entry in entries:
            tag = f"{getattr(entry, 'name', '') or ''} {getattr(entry, 'script', '') or ''}".lower()
            ours += "autolora" in tag
    hooks, modules = 0, 0
    seen = set()
    for root in module_roots:
        for module in getattr(root, "modules", lambda: [])():
            if id(module) in seen:
                continue
            seen.add(id(module))
            modules += 1
            hooks += len(module._forward_hooks) + len(module._forward_pre_hooks)
    # Raw RSS first, as the host left it; the trimmed reading collects garbage, so the tensors
    # counted after it are the ones still referenced, not cycles waiting for the collector.
    resident = memory_probe.resident_bytes()
    trimmed = memory_probe.trimmed_resident_bytes()
    tensor_bytes, tensors = memory_probe.live_tensor_bytes()
    return {"callbacks_total": sum(callbacks.values()), "callbacks_autolora": ours, "callbacks": callbacks,
            "module_hooks": hooks, "modules": modules, "resident_bytes": resident,
            "resident_bytes_trimmed": trimmed, "tensor_bytes": tensor_bytes, "tensor_storages": tensors,
            **(extra or {})}


def register_routes(app, reset_peak=None, residue=None) -> None:
    """GET /autolora/v1/params, GET /autolora/v1/stats, GET /autolora/v1/residue,
    POST /autolora/v1/reset-peak."""
    existing = {getattr(r, "path", None) for r in getattr(app, "routes", [])}

    def residue_now():
        return residue() if residue is not None else {"resident_bytes": memory_probe.resident_bytes()}

    def stats():
        return DIAGNOSTICS.snapshot()

    def table():
        return params_table()

    def reset():
        if reset_peak is not None:
            reset_peak()
        return {"ok": True}

    for path, fn, methods in ((f"{ROUTE_PREFIX}/params", table, ["GET"]), (f"{ROUTE_PREFIX}/stats", stats, ["GET"]),
                              (f"{ROUTE_PREFIX}/residue", residue_now, ["GET"]),
                              (f"{ROUTE_PREFIX}/reset-peak", reset, ["POST"])):
        if path not in existing:
            app.add_api_route(path, fn, methods=methods)


# -- X/Y/Z plot -------------------------------------------------------------------------------------

def apply_override(p, name: str, value) -> None:
    """Store one X/Y/Z value on `p`. The grid shallow-copies `p` per cell, so the dict is replaced,
    never mutated."""
    setattr(p, OVERRIDES_ATTR, {**(getattr(p, OVERRIDES_ATTR, None) or {}), name: value})


def xyz_axis_options(xyz_module) -> list:
    """AxisOptions for every `params.XYZ_PARAMS`, built with the X/Y/Z script's own classes."""
    options = []
    for param in params.XYZ_PARAMS:
        def apply(p, x, xs, _param=param):
            apply_override(p, _param.name, params.xyz_value(_param, x))

        def confirm(p, xs, _param=param):
            for x in xs:
                params.xyz_value(_param, x)  # raises AutoLoraArgumentError naming the value

        if param.kind == "bool":
            options.append(xyz_module.AxisOption(params.xyz_label(param), str, apply, confirm=confirm,
                                                 choices=xyz_module.boolean_choice(reverse=True)))
        else:
            options.append(xyz_module.AxisOption(params.xyz_label(param), float, apply, confirm=confirm))
    return options


def add_xyz_axes(xyz_module) -> int:
    """Append the AutoLoRA axes to the X/Y/Z script's `axis_options` once; returns how many were added."""
    have = {getattr(o, "label", None) for o in xyz_module.axis_options}
    new = [o for o in xyz_axis_options(xyz_module) if o.label not in have]
    xyz_module.axis_options.extend(new)
    return len(new)


def find_xyz_module(scripts_data) -> Optional[object]:
    """The loaded X/Y/Z plot script module (as other extensions find it)."""
    for data in scripts_data:
        if getattr(data.script_class, "__module__", "") == "xyz_grid.py" and hasattr(data.module, "axis_options"):
            return data.module
    return None
