"""``sidecar-proxy demo``: the daemon on the embedded default config, with traffic.

Starts the proxy exactly as ``sidecar-proxy run`` does (same App, same
admin), puts a tiny HTTP backend on the default ``app`` cluster's address
(127.0.0.1:8080) unless something already listens there, sends real
requests through the ``local`` listener, shows the proxy's own account of
them from the admin endpoint, and keeps serving until Ctrl-C or --duration.
"""
from __future__ import annotations

import asyncio
import json
import socket

import uvloop

from . import logs
from .admin.handlers import build_routes
from .admin.server import AdminServer
from .app import App
from .config import load

_BACKEND = ("127.0.0.1", 8080)
_LOCAL = ("127.0.0.1", 15080)
_ADMIN = ("127.0.0.1", 15000)


async def _backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        body = b"hello from the app behind the sidecar\n"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def _http_get(addr: tuple[str, int], path: str) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr), 5)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {addr[0]}\r\nConnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def _port_in_use(addr: tuple[str, int]) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(addr) == 0


async def _show_traffic() -> None:
    for i in range(3):
        reply = await _http_get(_LOCAL, f"/demo/{i}")
        status = reply.split(b"\r\n", 1)[0].decode(errors="replace")
        body = reply.partition(b"\r\n\r\n")[2].decode(errors="replace").strip()
        print(f"  GET http://127.0.0.1:15080/demo/{i} -> {status!r} body={body!r}")
    try:
        refused = await _http_get(("127.0.0.1", 15001), "/")
        status = refused.split(b"\r\n", 1)[0].decode(errors="replace")
        print(f"  straight to the transparent listener :15001 -> {status!r}: not redirected by iptables, "
              "so its original destination is the proxy itself (flag LOOP)")
    except (ConnectionError, OSError, RuntimeError, asyncio.TimeoutError) as exc:
        # RuntimeError: uvloop's answer to a write on a transport already reset.
        print(f"  straight to the transparent listener :15001 -> refused ({type(exc).__name__}): "
              "not redirected by iptables, so relaying it would loop")
    metrics = (await _http_get(_ADMIN, "/metrics")).decode(errors="replace")
    print("  the proxy's metrics (GET http://127.0.0.1:15000/metrics):")
    for line in metrics.splitlines():
        if line.startswith(("sidecar_tcp_connections_opened", "sidecar_tcp_connections_refused",
                            "sidecar_http_requests_total", "sidecar_protocol_detections_total")):
            print(f"    {line}")
    dump = json.loads((await _http_get(_ADMIN, "/config_dump")).partition(b"\r\n\r\n")[2])
    print(f"  live config: version {dump['live']['version']} from {dump['live']['source']}, "
          f"listeners {dump['listeners_bound']}")


def run_demo(duration: float | None) -> int:
    logs.configure("warning")
    config = load.load_file(load.default_config_path())

    async def main() -> int:
        app = App(config_path=None, drain_time=1.0)
        backend = None
        if _port_in_use(_BACKEND):
            print(f"something already listens on {_BACKEND[0]}:{_BACKEND[1]}; relaying to it")
        else:
            backend = await asyncio.start_server(_backend, *_BACKEND)
            print(f"demo backend on {_BACKEND[0]}:{_BACKEND[1]}")
        runner = asyncio.create_task(app.run(config, AdminServer(build_routes(app))))
        for _ in range(100):
            if app.is_ready()[0] or runner.done():
                break
            await asyncio.sleep(0.05)
        if runner.done():
            return runner.result()
        print("sidecar-proxy running on the embedded default config (admin http://127.0.0.1:15000)")
        try:
            await _show_traffic()
            print("try: curl http://127.0.0.1:15080/ ; curl http://127.0.0.1:15000/connections"
                  + ("" if duration is not None else "   (Ctrl-C to stop)"))
            if duration is not None:
                asyncio.get_running_loop().call_later(duration, app.request_stop)
            code = await runner
        finally:
            if not runner.done():
                app.request_stop()
                await runner
            if backend is not None:
                backend.close()
        return code

    try:
        return uvloop.run(main())
    except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
        print(f"demo failed: {exc}")
        return 1
    except KeyboardInterrupt:
        return 0
