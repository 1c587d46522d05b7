"""The extension's HTTP surface, under the host's own API rules.

Both hosts (A1111 and the Forge family share `modules/api/api.py`) put their API authentication on
each `/sdapi/v1/*` route as a FastAPI dependency (`Depends(Api.auth)` when `--api-auth` is set,
nothing otherwise; `--gradio-auth` alone leaves their API open). The extension takes those very
dependencies from the host's `/sdapi/v1/txt2img` route instead of judging credentials itself, so
every route here is as open or as closed as the host's API:

- GET /autolora/v1/params: the parameter table (API order, ranges, tooltips) for API clients
- GET /autolora/v1/stats: counters of the last AutoLoRA generation
- the diagnostic routes (lib_autolora/diagnostics.py), added by the script only when the
  environment variable AUTOLORA_DIAGNOSTICS=1 is set, under the same rules

The check of AutoLoRA's API arguments is one more dependency on the host's txt2img/img2img routes,
after the host's own: a bad value gets HTTP 422 with a message, and only a request the host
authenticated is ever told so. Without the host's API (no `--api`), nothing is added.

FastAPI only; nothing here imports WebUI code.
"""
from __future__ import annotations

from typing import Callable, Optional

from fastapi import Depends, HTTPException, Request
from fastapi.dependencies.utils import get_parameterless_sub_dependant

from .. import api_args

ROUTE_PREFIX = "/autolora/v1"
GENERATION_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")


def _route(app, path: str):
    return next((r for r in getattr(app, "routes", []) if getattr(r, "path", None) == path), None)


def host_api_dependencies(app) -> Optional[list]:
    """The dependencies the host puts on its own API routes, or None when it serves no API."""
    route = _route(app, GENERATION_PATHS[0])
    return None if route is None else list(getattr(route, "dependencies", None) or [])


CHECK_MARK = "_autolora_check"  # on the argument check added to the host's routes


def generation_request_check(unavailable: Optional[str] = None) -> Callable:
    """A dependency of the host's generation routes: 422 for bad AutoLoRA args (or for an enabled
    request when AutoLoRA is `unavailable` on this WebUI). The one rewrite (`"args": {...}` ->
    `[{...}]`) changes the parsed body in place, which FastAPI validates into the host's request
    model after its dependencies ran."""

    async def check_generation_request(request: Request) -> None:
        try:
            body = await request.json()
        except ValueError:  # not JSON: the host answers that itself
            return
        error = api_args.check_and_normalize(body, unavailable)
        if error is not None:
            raise HTTPException(status_code=422, detail=error)

    setattr(check_generation_request, CHECK_MARK, True)
    return check_generation_request


def _add_dependency(route, dependency: Callable) -> bool:
    """Append `dependency` to a route built already (the host's), after the host's own ones."""
    dependant = route.dependant
    if any(getattr(getattr(d, "call", None), CHECK_MARK, False) for d in dependant.dependencies):
        return False
    dependant.dependencies.append(get_parameterless_sub_dependant(depends=Depends(dependency), path=route.path_format))
    return True


def install(app, *, stats: Callable, params_table: Callable, unavailable: Optional[str] = None,
            extra_routes: tuple = ()) -> list:
    """Add the routes (and `extra_routes`, (path, endpoint, method) each) and the argument check to
    the host's FastAPI app (from on_app_started). Returns the paths added (none when the host
    serves no API)."""
    dependencies = host_api_dependencies(app)
    if dependencies is None:
        return []
    check = generation_request_check(unavailable)
    for path in GENERATION_PATHS:
        route = _route(app, path)
        if route is not None:
            _add_dependency(route, check)
    routes = [(f"{ROUTE_PREFIX}/params", params_table, "GET"), (f"{ROUTE_PREFIX}/stats", stats, "GET"),
              *extra_routes]
    added = []
    for path, endpoint, method in routes:
        if _route(app, path) is None:
            app.add_api_route(path, endpoint, methods=[method], dependencies=list(dependencies))
            added.append(path)
    return added
