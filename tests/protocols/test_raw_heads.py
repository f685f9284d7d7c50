"""The contract the proxy's forwarding relies on: a parsed head carries its bytes (``raw``), and
its field lines correspond one to one, in order, to ``headers`` (names lower-cased there)."""
from __future__ import annotations

import pytest

from sidecar_proxy.protocols.events import Limits, Sink
from sidecar_proxy.protocols.http1 import make_parser
from sidecar_proxy.protocols.http1.serialize import received_block, without


class Heads(Sink):
    def __init__(self) -> None:
        self.heads = []

    def on_head(self, head) -> None:
        self.heads.append(head)

    def on_data(self, data: bytes) -> None:
        pass

    def on_end(self, trailers) -> None:
        pass


REQUESTS = [
    b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nX-Mixed-Case: Value \r\nAccept:*/*\r\n\r\n",
    b"\r\nPOST /p HTTP/1.0\r\nHost: y\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
    b"OPTIONS * HTTP/1.1\r\nHost: z\r\n\r\n",
]


@pytest.fixture(params=["h11", "httptools"])
def codec(request):
    return request.param


@pytest.mark.parametrize("data", REQUESTS)
def test_request_heads_carry_their_bytes_line_for_line(codec, data):
    sink = Heads()
    make_parser(codec, "request", sink, Limits()).feed(data)
    (head,) = sink.heads
    start = 2 if data.startswith(b"\r\n") else 0  # a leading empty line is not part of the head
    assert head.raw == data[start:data.index(b"\r\n\r\n", start) + 4]
    lines = received_block(head)[:-2].split(b"\r\n")
    assert len(lines) == len(head.headers)
    for line, (name, _value) in zip(lines, head.headers):
        assert line.partition(b":")[0].lower() == name


def test_response_heads_carry_their_bytes_and_lines_can_be_dropped(codec):
    sink = Heads()
    parser = make_parser(codec, "response", sink, Limits())
    parser.expect(b"GET")
    parser.feed(b"HTTP/1.1 200 OK\r\nServer: t\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
    (head,) = sink.heads
    block = received_block(head)
    assert block == b"Server: t\r\nConnection: keep-alive\r\nContent-Length: 0\r\n"
    assert without(block, head.headers, {b"connection"}) == b"Server: t\r\nContent-Length: 0\r\n"
    assert without(block, head.headers, {b"server", b"connection", b"content-length"}) == b""
