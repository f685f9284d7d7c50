"""A small HTTP/1.1 server for the admin endpoint, on h11.

Not on the data path, so it uses asyncio streams for clarity. Every limit is
a number: header block, body, read time, concurrent connections. Handlers
return a :class:`Response`; an exception in one becomes a 500 with a log
line, never a dropped connection or a traceback to the client.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import h11

log = logging.getLogger("sidecar_proxy.admin")

MAX_HEADER_BYTES = 16 << 10
MAX_BODY_BYTES = 4 << 20
READ_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 64
_READ_CHUNK = 64 << 10


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes = b""


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    # Run after the response is written (e.g. exit after /quitquitquit).
    after: Callable[[], None] | None = None


def json_response(status: int, doc) -> Response:
    return Response(status, json.dumps(doc, indent=2, default=str).encode() + b"\n", "application/json")


def text_response(status: int, text: str) -> Response:
    return Response(status, text.encode() + b"\n")


Handler = Callable[[Request], Awaitable[Response]]


class _BadRequest(Exception):
    def __init__(self, status: int, text: str) -> None:
        self.status, self.text = status, text


class AdminServer:
    def __init__(self, routes: dict[str, dict[str, Handler]], max_connections: int = MAX_CONNECTIONS) -> None:
        # path -> method -> handler. Listing methods per path gives 405 + Allow.
        self.routes = routes
        self.max_connections = max_connections
        self.server: asyncio.AbstractServer | None = None
        self._open = 0

    async def start(self, address: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, address, port, limit=_READ_CHUNK)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self.max_connections:
            writer.close()
            return
        self._open += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        try:
            while True:
                try:
                    request = await asyncio.wait_for(self._read_request(conn, reader), READ_TIMEOUT_S)
                except asyncio.TimeoutError:
                    if conn.our_state is h11.SEND_RESPONSE:
                        await self._send(conn, writer, text_response(408, "request timeout"))
                    break
                except _BadRequest as exc:
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await self._send(conn, writer, text_response(exc.status, exc.text))
                    break
                if request is None:
                    break
                response = await self._dispatch(request)
                await self._send(conn, writer, response)
                if response.after is not None:
                    response.after()
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    break
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    break
        except (ConnectionError, h11.LocalProtocolError):
            pass
        finally:
            self._open -= 1
            writer.close()

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader) -> Request | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _BadRequest(exc.error_status_hint, f"bad request: {exc}") from None
            if event is h11.NEED_DATA:
                data = await reader.read(_READ_CHUNK)
                conn.receive_data(data)
                if not data and head is None and conn.their_state is h11.IDLE:
                    return None  # clean close between requests
                continue
            if isinstance(event, h11.Request):
                head = event
                # h11 bounds only a head still incomplete; one read can carry more.
                if sum(len(k) + len(v) + 4 for k, v in event.headers) > MAX_HEADER_BYTES:
                    raise _BadRequest(431, f"request header block larger than {MAX_HEADER_BYTES} bytes")
                headers = dict(event.headers)
                if b"content-length" in headers and b"transfer-encoding" in headers:
                    # h11 lets Transfer-Encoding win; two framings is a smuggling shape.
                    raise _BadRequest(400, "bad request: both Content-Length and Transfer-Encoding")
                declared = headers.get(b"content-length")
                if declared is not None and int(declared) > MAX_BODY_BYTES:
                    raise _BadRequest(413, f"body larger than {MAX_BODY_BYTES} bytes")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    raise _BadRequest(413, f"body larger than {MAX_BODY_BYTES} bytes")
            elif isinstance(event, h11.EndOfMessage):
                target = urlsplit(head.target.decode("ascii", "replace"))
                return Request(head.method.decode("ascii", "replace"), target.path, parse_qs(target.query),
                               {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers}, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _dispatch(self, request: Request) -> Response:
        methods = self.routes.get(request.path)
        if methods is None:
            return text_response(404, "not found; endpoints: " + " ".join(sorted(self.routes)))
        handler = methods.get(request.method)
        if handler is None:
            allow = ", ".join(sorted(methods))
            resp = text_response(405, f"{request.path} accepts {allow}")
            resp.headers.append(("Allow", allow))
            return resp
        try:
            return await handler(request)
        except Exception:
            log.exception("admin handler failed", extra={"fields": {"path": request.path}})
            return text_response(500, "internal error; see the proxy log")

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, response: Response) -> None:
        headers = [("Content-Type", response.content_type), ("Content-Length", str(len(response.body))),
                   ("Cache-Control", "no-store"), *response.headers]
        data = conn.send(h11.Response(status_code=response.status, headers=headers))
        data += conn.send(h11.Data(data=response.body)) if response.body else b""
        data += conn.send(h11.EndOfMessage())
        writer.write(data)
        await writer.drain()
