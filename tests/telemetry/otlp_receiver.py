"""A real OTLP/HTTP trace receiver for tests: decodes what the proxy exports with opentelemetry-proto.

Usage::

    with OtlpReceiver() as collector:          # 127.0.0.1, a free port
        ...  # point the proxy at collector.endpoint (http://127.0.0.1:PORT/v1/traces)
        spans = collector.wait_for_spans(3, timeout=10)
        tree = collector.by_id()                # span id (hex) -> Span

``mode`` simulates a bad collector: ``"ok"`` answers 200 with an empty ExportTraceServiceResponse,
``"unavailable"`` answers 503 (the exporter retries with backoff), ``"stall"`` reads the request and
never answers until the receiver stops. Requests are counted either way (``requests``).
Every wait has a deadline; the server thread is a daemon and stops with ``close()``.
"""
from __future__ import annotations

import gzip
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                       ExportTraceServiceResponse)

MAX_BODY = 64 << 20


def _value(v):
    """An AnyValue -> a Python value."""
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def attributes(kvs) -> dict:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class Span:
    """One decoded span, ids as lower-case hex ("" for no parent)."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str                 # "SERVER", "CLIENT", ...
    start_ns: int
    end_ns: int
    attributes: dict
    status: str               # "UNSET", "OK", "ERROR"
    resource: dict
    scope: str
    flags: int = 0
    trace_state: str = ""
    raw: object = field(default=None, repr=False)


_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


def decode(body: bytes) -> list[Span]:
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    out = []
    for rs in req.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(Span(trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                                parent_span_id=s.parent_span_id.hex(), name=s.name, kind=_KINDS.get(s.kind, "?"),
                                start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                                attributes=attributes(s.attributes), status=_STATUS.get(s.status.code, "?"),
                                resource=resource, scope=ss.scope.name, flags=s.flags, trace_state=s.trace_state,
                                raw=s))
    return out


class OtlpReceiver:
    def __init__(self, mode: str = "ok", host: str = "127.0.0.1", port: int = 0) -> None:
        self.mode = mode
        self.requests = 0
        self.encodings: list[str] = []          # Content-Encoding of each request ("" for none)
        self.content_types: list[str] = []
        self.headers: list[dict] = []           # each request's header fields (names lower-case)
        self.spans: list[Span] = []
        self.errors: list[str] = []             # requests the receiver could not decode
        self._cond = threading.Condition()
        self._release = threading.Event()       # ends stalls
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(length, MAX_BODY))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                with receiver._cond:
                    receiver.requests += 1
                    receiver.encodings.append(encoding)
                    receiver.content_types.append(self.headers.get("Content-Type") or "")
                    receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                    receiver._cond.notify_all()
                if self.path != "/v1/traces":
                    self._answer(404, b"", "text/plain")
                    return
                if receiver.mode == "stall":
                    receiver._release.wait(60)
                    self.close_connection = True
                    return
                if receiver.mode == "unavailable":
                    self._answer(503, b"unavailable", "text/plain")
                    return
                try:
                    if encoding == "gzip":
                        body = gzip.decompress(body)
                    elif encoding == "deflate":
                        body = zlib.decompress(body)
                    spans = decode(body)
                except Exception as exc:  # noqa: BLE001 - reported to the test, answered 400
                    with receiver._cond:
                        receiver.errors.append(f"{type(exc).__name__}: {exc}")
                        receiver._cond.notify_all()
                    self._answer(400, b"undecodable", "text/plain")
                    return
                with receiver._cond:
                    receiver.spans.extend(spans)
                    receiver._cond.notify_all()
                self._answer(200, ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf")

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint = f"http://{host}:{self.port}/v1/traces"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="otlp-receiver", daemon=True)
        self._thread.start()

    def wait_for_spans(self, count: int, timeout: float = 10.0) -> list[Span]:
        """At least ``count`` spans received (all of them returned); AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.spans) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.spans)} spans received in {timeout}s, expected {count} "
                                         f"(requests: {self.requests}, errors: {self.errors})")
                self._cond.wait(left)
            return list(self.spans)

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.requests < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.requests} export requests in {timeout}s, expected {count}")
                self._cond.wait(left)
            return self.requests

    def by_id(self) -> dict[str, Span]:
        with self._cond:
            return {s.span_id: s for s in self.spans}

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> OtlpReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
