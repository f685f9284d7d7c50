#!/usr/bin/env python3
"""Micro-benchmark of the HTTP/1.1 codecs and the serializer (not a test).

Usage: python3 benchmarks/codec_bench.py [-n N]

Prints the CPU time per message of: parsing a typical wrk request (GET, Host
and two more fields), a pipelined batch of them, a small nginx response (8
fields, 612-byte body), a chunked response, and serializing an 8-field head.
Each figure is the best of 5 runs of N messages on one parser (a parser per
connection is the proxy's pattern), so it excludes parser creation.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar_proxy.protocols.events import Limits, Sink  # noqa: E402
from sidecar_proxy.protocols.http1 import available_codecs, make_parser  # noqa: E402
from sidecar_proxy.protocols.http1 import serialize  # noqa: E402

WRK_GET = b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
BODY = b"x" * 612
NGINX = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.24.0\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
         b"Content-Type: text/html\r\nContent-Length: 612\r\nLast-Modified: Tue, 11 Apr 2023 01:45:34 GMT\r\n"
         b"Connection: keep-alive\r\nETag: \"6434bbbe-264\"\r\nAccept-Ranges: bytes\r\n\r\n" + BODY)
CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"1d\r\n{\"status\": \"ok\", \"items\": []}\r\n0\r\n\r\n")
HEADERS = [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"wrk/4.2"), (b"accept", b"*/*"),
           (b"x-request-id", b"3f1c9a7e-1b2c-4d5e-8f90-123456789abc"), (b"x-forwarded-for", b"10.0.0.1"),
           (b"x-forwarded-proto", b"http"), (b"content-type", b"application/json"), (b"content-length", b"42")]


class NullSink(Sink):
    def on_head(self, head): pass
    def on_data(self, data): pass
    def on_end(self, trailers): pass


def per_message(fn, n: int, per_call: int = 1) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        fn(n)
        best = min(best, time.process_time() - start)
    return best / (n * per_call) * 1e6


def parse_loop(codec: str, role: str, data: bytes):
    def loop(n: int) -> None:
        parser = make_parser(codec, role, NullSink(), Limits())
        feed = parser.feed
        if role == "response":
            expect = parser.expect
            for _ in range(n):
                expect(b"GET")
                feed(data)
        else:
            for _ in range(n):
                feed(data)
    return loop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20000, help="messages per run")
    n = ap.parse_args().n
    print(f"{'':28s}" + "".join(f"{codec:>12s}" for codec in available_codecs()) + "   (us per message)")
    rows = [
        ("wrk GET request", "request", WRK_GET, 1),
        ("10 pipelined GETs / feed", "request", WRK_GET * 10, 10),
        ("nginx 200 + 612 B body", "response", NGINX, 1),
        ("chunked 200 (1 chunk)", "response", CHUNKED, 1),
    ]
    for label, role, data, count in rows:
        figures = [per_message(parse_loop(codec, role, data), n // count, count) for codec in available_codecs()]
        print(f"{label:28s}" + "".join(f"{f:12.2f}" for f in figures))

    def request_head(k: int) -> None:
        for _ in range(k):
            serialize.request_head(b"GET", b"/index.html", HEADERS)

    def response_head(k: int) -> None:
        for _ in range(k):
            serialize.response_head(200, b"", HEADERS)

    def chunk(k: int) -> None:
        for _ in range(k):
            serialize.chunk(BODY)

    print(f"{'serialize request head (8)':28s}{per_message(request_head, n):12.2f}")
    print(f"{'serialize response head (8)':28s}{per_message(response_head, n):12.2f}")
    print(f"{'serialize chunk (612 B)':28s}{per_message(chunk, n):12.2f}")


if __name__ == "__main__":
    main()
