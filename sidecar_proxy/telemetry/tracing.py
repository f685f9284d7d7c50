"""OpenTelemetry tracing for the request path: a SERVER span per request, a CLIENT span per try.

Built for the HTTP/1 exchange, from the event loop thread only:

``trace = tracing.begin(req.headers)`` decides, from the incoming context and the sampler, with
one of three outcomes (costs measured by tests/telemetry/bench_telemetry.py):

- ``None`` (~0.9 us): a valid incoming context that is not sampled (or, with a sampler that is not
  parent-based, whose trace id the ratio rejects). The request is forwarded with its fields
  unchanged (traceparent, tracestate, b3), so the caller's decision travels on. Nothing else to do.
- :class:`NotSampled`: not sampled, and no context came in (or an invalid one). A fresh *unsampled*
  context is injected upstream (``traceparent: 00-<new trace id>-<new span id>-00``, and/or b3):
  the app's parent-based sampler then follows the proxy's decision, so the proxy's ratio is the
  mesh's ratio and every sampled app span has the proxy's SERVER span above it. ~0.9 us, of which
  0.7 us is the injection (``Tracing(..., inject_unsampled=False)`` returns None instead).
  ``trace_id`` is None: the access log shows ``-`` for traces that are not in the backend.
- :class:`Trace` (~110 us with its two spans' OTLP encoding, i.e. ~1.1 us per request at 1 %):
  sampled. SDK spans are made lazily (the SERVER span at the first try or at ``finish``,
  back-dated to ``begin``), each try gets a CLIENT span whose id goes upstream.

The sampler is parent-based by default: an incoming sampled flag is followed, an incoming
unsampled one too, and a request without context is sampled when the low 64 bits of its (new)
trace id fall under ``ratio * 2**64``: ParentBased(TraceIdRatioBased(ratio)) exactly
(:func:`sdk_sampler` builds that SDK sampler, and tests/telemetry checks that both decide alike
on every id). ``begin`` is the one place that decides, so the TracerProvider, which only ever sees
requests ``begin`` sampled, samples every span it is asked for: a second decision could only
disagree (a "sampled" request whose spans silently do not record). Spans are exported over
OTLP/HTTP by :class:`~.span_export.BoundedSpanProcessor` (bounded queue, drops counted).

Configuration: :func:`~.tracing_settings.resolve` (config keys, then OTEL_* variables, then defaults).
"""
from __future__ import annotations

import random
import time

from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from . import propagation
from .span_export import BoundedSpanProcessor
from .tracing_settings import TracingSettings, resolve

__all__ = ["NotSampled", "Trace", "Tracing", "TracingSettings", "error_type", "resolve", "sdk_sampler"]


def sdk_sampler(parent_based: bool, ratio: float) -> Sampler:
    """The SDK sampler that decides exactly as :meth:`Tracing.begin` does."""
    root = ALWAYS_ON if ratio >= 1.0 else ALWAYS_OFF if ratio <= 0.0 else TraceIdRatioBased(ratio)
    return ParentBased(root) if parent_based else root


class _PresetIds(RandomIdGenerator):
    """Lets ``begin`` choose a root trace id (it sampled by it) that the SDK then uses.

    Set just before the SERVER span starts, on the loop thread, and consumed by that span only.
    """

    def __init__(self) -> None:
        self.preset = 0

    def generate_trace_id(self) -> int:
        preset = self.preset
        if preset:
            self.preset = 0
            return preset
        return super().generate_trace_id()


# semconv http.request.method: these as they are; any other method is "_OTHER" (+ method_original).
_KNOWN_METHODS = frozenset((b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE",
                            b"PATCH", b"QUERY"))
# Response flags -> error.type when no status came back (low cardinality, per the semconv's advice).
FLAG_ERROR_TYPES = {"UF": "connect_failure", "UT": "timeout", "UC": "connection_reset", "UPE": "protocol_error",
                    "UO": "overflow", "DC": "downstream_closed", "LOOP": "loop"}
_VERSIONS = {b"1.1": "1.1", b"1.0": "1.0", b"2": "2"}
# What an unsampled request without context carries upstream (tracecontext only: the common case, inlined).
_FRESH_UNSAMPLED = b"traceparent: 00-%016x%016x-%016x-00\r\n"
_LOW64 = (1 << 64) - 1


def error_type(status: int, flags: str | None, client: bool) -> str | None:
    """semconv error.type: the status code when it says error (5xx; for a CLIENT span 4xx too), else
    what the flag says went wrong before any status, else None."""
    if status >= 500 or (client and status >= 400):
        return str(status)
    if flags and flags != "-":
        return FLAG_ERROR_TYPES.get(flags.split(",", 1)[0])
    return None


def _split_authority(authority: bytes) -> tuple[str, int | None]:
    text = authority.decode("ascii", "replace")
    if text.startswith("["):   # semconv: an IPv6 server.address is written without brackets
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    return host, int(port) if port.isdigit() else None


class NotSampled:
    """Not sampled, no incoming context: every try forwards the same fresh unsampled context."""

    __slots__ = ("lines",)
    sampled = False
    trace_id = None

    def __init__(self, lines: bytes) -> None:
        self.lines = lines

    def request(self, *args, **kwargs) -> None:
        pass

    def client_attempt(self, *args, **kwargs) -> tuple[None, bytes]:
        return None, self.lines

    def end_attempt(self, *args, **kwargs) -> None:
        pass

    def finish(self, *args, **kwargs) -> None:
        pass


class Trace:
    """A sampled request: the SERVER span and its CLIENT spans, created through the SDK."""

    __slots__ = ("_tracing", "trace_id", "_tid", "_parent", "_tracestate", "_start_ns", "_server", "_attrs",
                 "_method", "_url", "_server_ctx")
    sampled = True

    def __init__(self, tracing: Tracing, trace_id: int, parent: SpanContext | None, tracestate: bytes | None,
                 start_ns: int) -> None:
        self._tracing = tracing
        self._tid = trace_id
        self.trace_id = "%032x" % trace_id   # for the access log
        self._parent = parent
        self._tracestate = tracestate
        self._start_ns = start_ns
        self._server = None
        self._server_ctx = None
        self._attrs: dict = {}
        self._method = "HTTP"
        self._url = ""

    def request(self, method: bytes, path: bytes, authority: bytes | None = None, version: bytes = b"1.1",
                scheme: str = "http", user_agent: bytes | None = None, client_address: str | None = None,
                peer_identity: str | None = None) -> None:
        """What the request says; call once, before the first try (``path``: without the query)."""
        attrs = self._attrs
        name = method.decode("ascii", "replace")
        if method in _KNOWN_METHODS:
            attrs["http.request.method"] = self._method = name
        else:   # semconv: a method outside the known set is "_OTHER", and the span is named "HTTP"
            attrs["http.request.method"] = "_OTHER"
            attrs["http.request.method_original"] = name
        p = path.decode("utf-8", "replace")
        attrs["url.path"] = p
        attrs["url.scheme"] = scheme
        if authority:
            host, port = _split_authority(authority)
            attrs["server.address"] = host
            if port is not None:
                attrs["server.port"] = port
            self._url = f"{scheme}://{authority.decode('ascii', 'replace')}{p}"
        attrs["network.protocol.name"] = "http"
        attrs["network.protocol.version"] = _VERSIONS.get(version, version.decode("ascii", "replace"))
        if user_agent:
            attrs["user_agent.original"] = user_agent.decode("utf-8", "replace")[:512]
        if client_address:
            attrs["client.address"] = client_address
        if peer_identity:
            attrs["sidecar.peer_identity"] = peer_identity  # the client's SPIFFE ID (mTLS)

    def _server_span(self):
        span = self._server
        if span is None:
            tracing = self._tracing
            if self._parent is None:
                tracing._ids.preset = self._tid
                ctx = _EMPTY_CONTEXT
            else:
                ctx = trace_api.set_span_in_context(NonRecordingSpan(self._parent))
            span = self._server = tracing.tracer.start_span(
                self._method, context=ctx, kind=SpanKind.SERVER, attributes=self._attrs, start_time=self._start_ns)
            self._server_ctx = trace_api.set_span_in_context(span)
        return span

    def client_attempt(self, cluster: str, address: str, port: int, attempt: int = 0,
                       start_ns: int | None = None) -> tuple[object, bytes]:
        """A try to ``address:port`` of ``cluster`` (``attempt``: 0 first, then 1, 2 for retries).
        Returns the CLIENT span (for ``end_attempt``) and the field lines to add to that try's head."""
        self._server_span()
        attrs = self._attrs
        client_attrs = {"http.request.method": attrs.get("http.request.method", "_OTHER"),
                        "server.address": address, "server.port": port, "network.peer.address": address,
                        "network.peer.port": port, "network.protocol.name": "http",
                        "network.protocol.version": attrs.get("network.protocol.version", "1.1"),
                        "sidecar.cluster": cluster, "sidecar.retry_attempt": attempt}
        if self._url:
            client_attrs["url.full"] = self._url
        if attempt:
            client_attrs["http.request.resend_count"] = attempt
        span = self._tracing.tracer.start_span(self._method, context=self._server_ctx, kind=SpanKind.CLIENT,
                                               attributes=client_attrs, start_time=start_ns)
        ctx = span.get_span_context()
        return span, self._tracing.injector.lines(ctx.trace_id, ctx.span_id, True, self._tracestate,
                                                  int(ctx.trace_flags))

    def end_attempt(self, span, status: int = 0, flags: str | None = None, end_ns: int | None = None,
                    error: str | None = None) -> None:
        """The try ended: with a response head (``status``), or without (``status`` 0 and the flag saying
        why: UF, UT, UC, UPE). ``error`` overrides the error.type derived from them (e.g. "tls")."""
        if span is None:
            return
        if status:
            span.set_attribute("http.response.status_code", status)
        err = error or error_type(status, flags, client=True)
        if err is not None:
            span.set_attribute("error.type", err)
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_ns)

    def finish(self, status: int, flags: str = "-", route: str | None = None, cluster: str | None = None,
               end_ns: int | None = None, error: str | None = None) -> None:
        """The response ended (or the request was given up): end the SERVER span, once. ``status`` 0: none
        sent. ``error`` overrides the error.type derived from status and flags."""
        span = self._server_span()
        if route:
            span.update_name(f"{self._method} {route}")
            span.set_attribute("sidecar.route", route)
        if cluster:
            span.set_attribute("sidecar.cluster", cluster)
        if status:
            span.set_attribute("http.response.status_code", status)
        span.set_attribute("sidecar.response_flags", flags or "-")
        err = error or error_type(status, flags, client=False)
        if err is not None:
            span.set_attribute("error.type", err)
            if status >= 500 or not status:
                span.set_status(Status(StatusCode.ERROR))
        span.end(end_ns)


# Roots start from an empty context, never from whatever the loop's current context holds.
_EMPTY_CONTEXT = Context()


class Tracing:
    """One per process. ``begin`` and the Trace methods from the event loop thread only."""

    def __init__(self, settings: TracingSettings, exporter: SpanExporter | None = None,
                 inject_unsampled: bool = True) -> None:
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            exporter = OTLPSpanExporter(endpoint=settings.endpoint)
        self.settings = settings
        self.processor = BoundedSpanProcessor(exporter, settings.max_queue_size, settings.max_export_batch_size,
                                              settings.schedule_delay)
        attributes = {"service.name": settings.service_name, **settings.resource_attributes}
        self._ids = _PresetIds()
        self.provider = TracerProvider(sampler=ALWAYS_ON,   # begin() decided; see the module docstring
                                       resource=Resource.create(attributes), shutdown_on_exit=False,
                                       id_generator=self._ids)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("sidecar_proxy")
        self.parent_based = settings.parent_based
        self.bound = round(settings.ratio * (1 << 64))   # TraceIdRatioBased.get_bound_for_rate
        self.propagators = settings.propagators
        self.injector = propagation.Injector(settings.propagators)
        # Fields a request carrying our lines must not also forward from the client (see begin()).
        self.drop_fields: frozenset[bytes] = propagation.names_for(settings.propagators)
        self.inject_unsampled = inject_unsampled and bool(settings.propagators)
        self._w3c_only = settings.propagators == (propagation.TRACECONTEXT,)
        self.sampled = 0   # traces begun sampled (loop thread)
        self._random = random.getrandbits

    # --- counters for metrics

    @property
    def dropped(self) -> int:
        return self.processor.dropped

    @property
    def exported(self) -> int:
        return self.processor.exported

    @property
    def export_failures(self) -> int:
        return self.processor.export_failures

    # --- the hot path

    def begin(self, headers: list, start_ns: int | None = None) -> Trace | NotSampled | None:
        """Decide for one request from its fields (lower-case names). ``start_ns``: time.time_ns() of
        the request's first byte (default: now). See the module docstring for the three outcomes."""
        names = self.drop_fields
        ctx = None
        if names:
            ctx = propagation.extract(headers, self.propagators, names)[0]
        if ctx is not None and ctx[0]:
            trace_hex, span_hex, decision, tracestate = ctx
            if self.parent_based and decision is not None:
                if not decision:
                    return None   # the common unsampled case: no id converted, nothing made
            elif int(trace_hex[16:], 16) >= self.bound:
                return None
            self.sampled += 1
            trace_id = int(trace_hex, 16)
            parent = SpanContext(trace_id, int(span_hex, 16), is_remote=True, trace_flags=TraceFlags(1))
            # The received tracestate is re-sent as it came (Injector), not parsed into the SDK's
            # TraceState: that would cost per request and log a warning for every malformed one.
            return Trace(self, trace_id, parent, tracestate, start_ns or time.time_ns())
        random_ = self._random
        low = random_(64)
        if ctx is not None and self.parent_based:
            # A decision without ids (b3: 0 / b3: 1): followed, with a new trace.
            if not ctx[2]:
                return None
        elif low >= self.bound:
            if not self.inject_unsampled:
                return None
            if self._w3c_only:
                return NotSampled(_FRESH_UNSAMPLED % (random_(64), low, random_(64) or 1))
            return NotSampled(self.injector.lines((random_(64) << 64) | low, random_(64) or 1, False))
        self.sampled += 1
        return Trace(self, (random_(64) << 64) | low or 1, None, None, start_ns or time.time_ns())

    # --- lifecycle

    def force_flush(self, timeout: float = 5.0) -> bool:
        return self.processor.force_flush(int(timeout * 1000))

    def shutdown(self, timeout: float = 5.0) -> None:
        """Export what is queued, at most ``timeout`` seconds (a dead collector cannot hold the drain)."""
        self.processor.shutdown(timeout)
        self.provider.shutdown()
