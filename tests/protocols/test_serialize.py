"""The HTTP/1.1 serializer: exact bytes, and no way to inject a field."""
import pytest

from sidecar_proxy.protocols.events import BODY_CHUNKED, Limits, Sink
from sidecar_proxy.protocols.http1 import CODECS, make_parser
from sidecar_proxy.protocols.http1.serialize import (InvalidHeader, chunk, last_chunk, local_response,
                                                     request_head, response_head)

HEADERS = [(b"host", b"example.com:8080"), (b"user-agent", b"wrk"), (b"x-obs", b"caf\xe9"),
           (b"x-empty", b""), (b"x-tab", b"a\tb"), (b"cookie", b"a=b"), (b"cookie", b"c=d")]


def test_request_head():
    assert request_head(b"GET", b"/a?b=c", [(b"host", b"h"), (b"X-Case", b"Kept")]) == (
        b"GET /a?b=c HTTP/1.1\r\nhost: h\r\nX-Case: Kept\r\n\r\n")
    assert request_head(b"OPTIONS", b"*", []) == b"OPTIONS * HTTP/1.1\r\n\r\n"
    assert request_head(b"CONNECT", b"a:443", ((b"host", b"a:443"),)) == (
        b"CONNECT a:443 HTTP/1.1\r\nhost: a:443\r\n\r\n")


def test_response_head():
    assert response_head(200, b"", [(b"content-length", b"0")]) == b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    assert response_head(404, b"Nope", []) == b"HTTP/1.1 404 Nope\r\n\r\n"
    assert response_head(503, b"", [], version=b"1.0") == b"HTTP/1.0 503 Service Unavailable\r\n\r\n"
    assert response_head(599, b"", []) == b"HTTP/1.1 599 \r\n\r\n"       # no standard phrase
    assert response_head(200, b"O\tK \xff", []) == b"HTTP/1.1 200 O\tK \xff\r\n\r\n"


def test_chunks():
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert last_chunk() == last_chunk(None) == last_chunk([]) == b"0\r\n\r\n"
    assert last_chunk([(b"x-sum", b"1"), (b"x-b", b"")]) == b"0\r\nx-sum: 1\r\nx-b: \r\n\r\n"


def test_local_response():
    assert local_response(400, b"bad request\n", close=True) == (
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"connection: close\r\n\r\nbad request\n")
    assert local_response(503) == b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
    assert local_response(204, headers=[(b"x", b"y")]) == b"HTTP/1.1 204 No Content\r\nx: y\r\n\r\n"
    assert local_response(200, b"{}", [(b"Content-Type", b"application/json")]) == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nContent-Type: application/json\r\n\r\n{}")


INJECTIONS = [
    ("CRLF in value", dict(headers=[(b"x", b"a\r\nevil: 1")])),
    ("LF in value", dict(headers=[(b"x", b"a\nevil: 1")])),
    ("CR in value", dict(headers=[(b"x", b"a\rb")])),
    ("NUL in value", dict(headers=[(b"x", b"a\x00b")])),
    ("LF and NUL in value", dict(headers=[(b"x", b"a\nb\x00c")])),
    ("CTL in value", dict(headers=[(b"x", b"a\x01b")])),
    ("DEL in value", dict(headers=[(b"x", b"a\x7fb")])),
    ("VT in value", dict(headers=[(b"x", b"a\x0bb")])),
    ("CRLF in name", dict(headers=[(b"x\r\nevil", b"1")])),
    ("colon space in name", dict(headers=[(b"x: y", b"1")])),
    ("colon in name", dict(headers=[(b"x:y", b"1")])),
    ("space in name", dict(headers=[(b"x y", b"1")])),
    ("empty name", dict(headers=[(b"", b"1")])),
    ("separator in name", dict(headers=[(b"x(y)", b"1")])),
    ("NUL in name", dict(headers=[(b"x\x00", b"1")])),
    ("obs-text in name", dict(headers=[(b"caf\xe9", b"1")])),
    ("bad field after good ones", dict(headers=HEADERS + [(b"x", b"\r\n")])),
    ("space in method", dict(method=b"G T")),
    ("empty method", dict(method=b"")),
    ("CRLF in method", dict(method=b"GET\r\n")),
    ("space in target", dict(target=b"/a b")),
    ("CRLF in target", dict(target=b"/a\r\nevil: 1")),
    ("LF in target", dict(target=b"/a\n")),
    ("empty target", dict(target=b"")),
    ("obs-text in target", dict(target=b"/caf\xe9")),
]


@pytest.mark.parametrize("name, parts", INJECTIONS, ids=[i[0] for i in INJECTIONS])
def test_request_injection_refused(name, parts):
    args = dict(method=b"GET", target=b"/", headers=[(b"host", b"a")]) | parts
    with pytest.raises(InvalidHeader):
        request_head(**args)
    if "headers" in parts:
        with pytest.raises(InvalidHeader):
            response_head(200, b"", parts["headers"])
        with pytest.raises(InvalidHeader):
            last_chunk(parts["headers"])
        with pytest.raises(InvalidHeader):
            local_response(200, b"x", parts["headers"])


@pytest.mark.parametrize("status, reason, version", [
    (200, b"OK\r\nevil: 1", b"1.1"), (200, b"O\nK", b"1.1"), (200, b"O\x00K", b"1.1"), (200, b"O\x01K", b"1.1"),
    (99, b"", b"1.1"), (1000, b"", b"1.1"), (200, b"", b"2"), (200, b"", b"1.1\r\n"),
])
def test_response_start_line_refused(status, reason, version):
    with pytest.raises(InvalidHeader):
        response_head(status, reason, [], version)


def test_invalid_header_is_a_value_error():
    assert issubclass(InvalidHeader, ValueError)


class Recorder(Sink):
    def __init__(self):
        self.heads, self.data, self.trailers = [], b"", []

    def on_head(self, head):
        self.heads.append(head)

    def on_data(self, data):
        self.data += data

    def on_end(self, trailers):
        self.trailers.append(trailers)


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip(codec):
    """What the serializer writes, both codecs read back unchanged."""
    wire = (request_head(b"POST", b"/up?x=1", HEADERS + [(b"transfer-encoding", b"chunked")])
            + chunk(b"hello ") + chunk(b"world") + last_chunk([(b"x-sum", b"abc")]))
    sink = Recorder()
    parser = make_parser(codec, "request", sink, Limits())
    assert parser.feed(wire) is None
    (head,) = sink.heads
    assert (head.method, head.target, head.framing) == (b"POST", b"/up?x=1", BODY_CHUNKED)
    assert head.headers == HEADERS + [(b"transfer-encoding", b"chunked")]
    assert sink.data == b"hello world" and sink.trailers == [[(b"x-sum", b"abc")]]

    sink = Recorder()
    parser = make_parser(codec, "response", sink, Limits())
    parser.expect(b"GET")
    parser.feed(local_response(502, b"upstream went away\n", close=True))
    (head,) = sink.heads
    assert (head.status, head.reason, head.keep_alive, head.length) == (502, b"Bad Gateway", False, 19)
    assert sink.data == b"upstream went away\n" and sink.trailers == [None]
