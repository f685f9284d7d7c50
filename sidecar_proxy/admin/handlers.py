"""Admin endpoints. Reads are GET; anything that changes state is POST."""
from __future__ import annotations

import platform
import time
from typing import TYPE_CHECKING

from .. import __version__, compiled
from ..addr import format_addr
from ..config.dump import to_document
from ..config.snapshot import UpdateRejected
from ..protocols.http1 import available_codecs
from .server import Handler, Request, Response, json_response, text_response

if TYPE_CHECKING:
    from ..app import App

CONNECTIONS_DEFAULT_LIMIT = 1000
CONNECTIONS_MAX_LIMIT = 10_000


def build_routes(app: App) -> dict[str, dict[str, Handler]]:
    async def ready(_: Request) -> Response:
        ok, reason = app.is_ready()
        return text_response(200 if ok else 503, reason)

    async def live(_: Request) -> Response:
        return text_response(200, "live")

    async def metrics(req: Request) -> Response:
        body, content_type = app.metrics.render(req.headers.get("accept", ""))
        return Response(200, body, content_type)

    async def config_dump(_: Request) -> Response:
        snap = app.store.current
        doc = {"live": None, "last_rejected": app.last_reload_error,
               "control": app.control.status() if app.control is not None else None,
               "listeners_bound": {n: format_addr(a) for n, a in app.listeners.bound_addresses().items()}}
        if snap is not None:
            doc["live"] = {"version": snap.version, "digest": snap.digest, "source": snap.source,
                           "resource_versions": dict(snap.versions),
                           "loaded_at": snap.loaded_at, "age_s": round(time.time() - snap.loaded_at, 3),
                           "config": to_document(snap.config)}
        return json_response(200, doc)

    async def post_config(req: Request) -> Response:
        if app.draining:
            return json_response(503, {"errors": [{"path": "", "error": "the proxy is draining"}]})
        try:
            snap = await app.apply_text(req.body, "admin")
        except UpdateRejected as exc:
            return json_response(400, {"applied": False,
                                       "errors": [{"path": p, "error": m} for p, m in exc.errors]})
        return json_response(200, {"applied": True, "version": snap.version, "digest": snap.digest})

    async def connections(req: Request) -> Response:
        try:
            limit = int(req.query.get("limit", [CONNECTIONS_DEFAULT_LIMIT])[0])
        except ValueError:
            return text_response(400, "limit must be an integer")
        limit = max(0, min(limit, CONNECTIONS_MAX_LIMIT))
        now = time.monotonic()
        shown = []
        for relay in app.listeners.connections():
            if len(shown) >= limit:
                break
            shown.append(relay.describe(now))
        return json_response(200, {"total": app.listeners.active_count(), "shown": len(shown),
                                   "connections": shown})

    async def clusters(_: Request) -> Response:
        """Each cluster's breakers (in flight / limit / overflows), retry counts and ejected endpoints."""
        states = app.listeners.cluster_states.states
        return json_response(200, {"clusters": {name: state.stats() for name, state in sorted(states.items())}})

    async def tls(_: Request) -> Response:
        """The workload identity in use (SPIFFE ID, serial, expiry) and its rotations."""
        mesh = app.listeners.mesh
        return json_response(200, {"tls": mesh.status() if mesh is not None else None})

    async def server_info(_: Request) -> Response:
        """What is running: versions, uptime, and whether the data path is the compiled one."""
        return json_response(200, {"version": __version__, "python": platform.python_version(),
                                   "uptime_s": round(time.time() - app.started_at, 1),
                                   "http1_codecs": available_codecs(), **compiled.status()})

    async def drain(_: Request) -> Response:
        app.begin_drain()
        return json_response(200, {"draining": True, "active_connections": app.listeners.active_count(),
                                   "drain_time_s": app.drain_time})

    async def quit_(_: Request) -> Response:
        resp = json_response(200, {"draining": True, "exit_after_drain": True,
                                   "active_connections": app.listeners.active_count()})
        resp.after = app.request_stop
        return resp

    return {
        "/ready": {"GET": ready},
        "/live": {"GET": live},
        "/metrics": {"GET": metrics},
        "/config_dump": {"GET": config_dump},
        "/config": {"POST": post_config},
        "/connections": {"GET": connections},
        "/clusters": {"GET": clusters},
        "/tls": {"GET": tls},
        "/server_info": {"GET": server_info},
        "/drain": {"POST": drain},
        "/quitquitquit": {"POST": quit_},
    }
