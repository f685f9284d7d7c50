"""Per-request HTTP histograms: duration, upstream time, request and response body sizes.

One :class:`RequestRecorder` per (listener, cluster), bound once per
snapshot; the exchange calls ``recorder.record(...)`` once when a request
ends. Its children are resolved up front (the duration child per status
class included), so a request costs four bisects and no dict lookup
(~0.9 us measured, against the issue's 3 us for all metrics).

Labels are config names and the status class only: listeners x clusters x 6
series per histogram, bounded by the config.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry

from .histogram import DURATION_BUCKETS, SIZE_BUCKETS, HistogramFamily

# status // 100 -> code_class label; index 0 is a request that got no status (the client left first).
CODE_CLASSES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")


class RequestRecorder:
    __slots__ = ("_duration", "_upstream", "_request_size", "_response_size")

    def __init__(self, duration: tuple, upstream, request_size, response_size) -> None:
        self._duration = duration            # observe methods indexed by status // 100
        self._upstream = upstream
        self._request_size = request_size
        self._response_size = response_size

    def record(self, status: int, duration: float, upstream_time: float | None, request_bytes: int,
               response_bytes: int) -> None:
        """``duration``: first byte of the request head to the last byte of the response written, in
        seconds. ``upstream_time``: request head written upstream to response head received (None when
        no upstream answered). Bytes: body bytes received from the client and sent to it."""
        self._duration[status // 100 if 100 <= status < 600 else 0](duration)
        if upstream_time is not None:
            self._upstream(upstream_time)
        self._request_size(request_bytes)
        self._response_size(response_bytes)


class HttpMetrics:
    """The histogram families, registered in the process registry (telemetry.metrics.Metrics.registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = HistogramFamily(
            "sidecar_http_request_duration_seconds",
            "HTTP requests from the first byte of the request to the last byte of the response, as the "
            "client saw them through the proxy.", ["listener", "cluster", "code_class"], DURATION_BUCKETS)
        self.upstream = HistogramFamily(
            "sidecar_http_upstream_response_seconds",
            "From the request head written to the upstream to its response head (the upstream service "
            "time), of the try whose response went to the client.", ["cluster"], DURATION_BUCKETS)
        self.request_size = HistogramFamily(
            "sidecar_http_request_body_bytes", "Request body bytes received from clients.",
            ["listener", "cluster"], SIZE_BUCKETS)
        self.response_size = HistogramFamily(
            "sidecar_http_response_body_bytes", "Response body bytes sent to clients.",
            ["listener", "cluster"], SIZE_BUCKETS)
        for family in (self.duration, self.upstream, self.request_size, self.response_size):
            registry.register(family)

    def recorder(self, listener: str, cluster: str) -> RequestRecorder:
        """``cluster``: the cluster name, or "none" for what the proxy answered itself (no route, 429, ...)."""
        duration = tuple(self.duration.labels(listener, cluster, cc).observe for cc in CODE_CLASSES)
        return RequestRecorder(duration, self.upstream.labels(cluster).observe,
                               self.request_size.labels(listener, cluster).observe,
                               self.response_size.labels(listener, cluster).observe)
