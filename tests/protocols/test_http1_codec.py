"""One suite for both HTTP/1.1 codecs: every test runs on h11 and httptools.

Valid inputs are fed whole, byte by byte and in random pieces, and must give
the same events (and the same events on both codecs); malformed inputs must
give the same status on both codecs.
"""
import random

import pytest

from sidecar_proxy.protocols.events import (BODY_CHUNKED, BODY_LENGTH, BODY_NONE, BODY_TUNNEL,
                                            BODY_UNTIL_CLOSE, FLAG_DOWNSTREAM_PROTOCOL_ERROR,
                                            FLAG_UPSTREAM_PROTOCOL_ERROR, HttpError, Limits, Request, Sink)
from sidecar_proxy.protocols.http1 import CODECS, make_parser
from sidecar_proxy.protocols.http1.strict import MAX_CHUNK_LINE_BYTES

LIMITS = Limits()


@pytest.fixture(params=["h11", "httptools"])
def codec(request):
    return request.param


def other(codec):
    return next(c for c in CODECS if c != codec)


class Recorder(Sink):
    """A sink that records what the codec delivers, heads as plain tuples."""

    def __init__(self):
        self.events = []

    def on_head(self, head):
        if isinstance(head, Request):
            self.events.append(("request", head.method, head.target, head.path, head.authority,
                                head.headers, head.version, head.keep_alive, head.framing, head.length,
                                head.upgrade, head.expect_continue))
        else:
            self.events.append(("response", head.status, head.reason, head.headers, head.version,
                                head.keep_alive, head.framing, head.length))

    def on_data(self, data):
        assert isinstance(data, bytes) and data
        self.events.append(("data", data))

    def on_end(self, trailers):
        self.events.append(("end", trailers))


def merged(events):
    """Consecutive data events joined: how body bytes are cut is the feeder's business."""
    out = []
    for event in events:
        if event[0] == "data" and out and out[-1][0] == "data":
            out[-1] = ("data", out[-1][1] + event[1])
        else:
            out.append(event)
    return out


def run(codec, data, role="request", pieces=None, methods=(), limits=LIMITS, eof=False):
    """Feed ``data`` (whole, or cut into ``pieces`` sizes) -> (events, rest, eof result)."""
    sink = Recorder()
    parser = make_parser(codec, role, sink, limits)
    for method in methods:
        parser.expect(method)
    rest = None
    chunks = [data] if pieces is None else list(_cut(data, pieces))
    for i, chunk in enumerate(chunks):
        rest = parser.feed(chunk)
        if rest is not None:
            rest += b"".join(chunks[i + 1:])
            break
    clean = parser.feed_eof() if eof else None
    return merged(sink.events), rest, clean


def _cut(data, pieces):
    if isinstance(pieces, int):
        for i in range(0, len(data), pieces):
            yield data[i:i + pieces]
        return
    pos = 0
    for size in pieces:
        if pos >= len(data):
            return
        yield data[pos:pos + size]
        pos += size
    if pos < len(data):
        yield data[pos:]


def error(codec, data, role="request", pieces=None, methods=(b"GET",), limits=LIMITS):
    with pytest.raises(HttpError) as info:
        run(codec, data, role, pieces, methods if role == "response" else (), limits)
    return info.value


def req(method, target, headers, version=b"1.1", keep_alive=True, framing=BODY_NONE, length=0,
        upgrade=None, expect=False, path=None, authority=None):
    if path is None:
        path = target.partition(b"?")[0]
    if authority is None:
        authority = dict(headers).get(b"host")
    return ("request", method, target, path, authority, headers, version, keep_alive, framing, length,
            upgrade, expect)


def resp(status, reason, headers, version=b"1.1", keep_alive=True, framing=BODY_NONE, length=0):
    return ("response", status, reason, headers, version, keep_alive, framing, length)


END = ("end", None)

# -- requests -------------------------------------------------------------------

WRK_GET = b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"


def test_simple_get(codec):
    events, rest, _ = run(codec, WRK_GET)
    headers = [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"wrk"), (b"accept", b"*/*")]
    assert events == [req(b"GET", b"/index.html", headers), END]
    assert rest is None


def test_query_path_and_stripped_values(codec):
    data = b"GET /a/b?x=1&y=2 HTTP/1.1\r\nHost:  h \t\r\nX-Empty:\r\nX-Obs: caf\xe9 \r\nX-Tab:\tv\tw\r\n\r\n"
    events, _, _ = run(codec, data)
    headers = [(b"host", b"h"), (b"x-empty", b""), (b"x-obs", b"caf\xe9"), (b"x-tab", b"v\tw")]
    assert events == [req(b"GET", b"/a/b?x=1&y=2", headers, path=b"/a/b"), END]


@pytest.mark.parametrize("version, connection, keep_alive", [
    (b"1.1", None, True),
    (b"1.1", b"close", False),
    (b"1.1", b"Close", False),
    (b"1.1", b"keep-alive", True),
    (b"1.1", b"foo, CLOSE", False),
    (b"1.0", None, False),
    (b"1.0", b"keep-alive", True),
    (b"1.0", b"Keep-Alive", True),
    (b"1.0", b"te, keep-alive", True),
    (b"1.0", b"close", False),
    (b"1.0", b"keep-alive, close", False),
])
def test_keep_alive(codec, version, connection, keep_alive):
    head = b"GET / HTTP/" + version + b"\r\nHost: a\r\n"
    if connection is not None:
        head += b"Connection: " + connection + b"\r\n"
    events, _, _ = run(codec, head + b"\r\n")
    assert events[0][7] is keep_alive


def test_http10_without_host(codec):
    events, _, _ = run(codec, b"GET / HTTP/1.0\r\n\r\n")
    assert events == [req(b"GET", b"/", [], version=b"1.0", keep_alive=False, authority=None), END]


def test_pipelined_in_one_feed(codec):
    data = (b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
            b"POST /3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
            b"GET /4 HTTP/1.1\r\nHost: a\r\n\r\n")
    events, rest, clean = run(codec, data, eof=True)
    assert [e[2] if e[0] == "request" else e for e in events] == [
        b"/1", END, b"/2", ("data", b"hello"), END, b"/3", ("data", b"hi"), END, b"/4", END]
    assert rest is None and clean is True


def test_content_length_split_across_feeds(codec):
    data = b"PUT /u HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    for pieces in ([40, 5, 3, 100], [len(data) - 40, 2, 2, 36], 7):
        events, _, _ = run(codec, data, pieces=pieces)
        assert events == [
            req(b"PUT", b"/u", [(b"host", b"a"), (b"content-length", b"10")], framing=BODY_LENGTH, length=10),
            ("data", b"0123456789"), END, req(b"GET", b"/", [(b"host", b"a")]), END]


def test_body_chunks_arrive_as_they_come(codec):
    sink = Recorder()
    parser = make_parser(codec, "request", sink, LIMITS)
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nab")
    assert sink.events[-1] == ("data", b"ab")
    parser.feed(b"cd")
    assert merged(sink.events)[-1] == ("data", b"abcd")
    assert parser.feed_eof() is False     # cut short


def test_chunked_extensions_and_trailers(codec):
    data = (b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n"
            b"5;name=value;flag;q=\"a \\\"quoted\\\" ;x\"\r\nhello\r\n"
            b"A\r\n0123456789\r\n"
            b"0;last=1\r\nX-Checksum: abc\r\nX-Other:  v \r\n\r\n")
    events, _, _ = run(codec, data)
    assert events == [
        req(b"POST", b"/c", [(b"host", b"a"), (b"transfer-encoding", b"Chunked")], framing=BODY_CHUNKED),
        ("data", b"hello0123456789"),
        ("end", [(b"x-checksum", b"abc"), (b"x-other", b"v")])]


def test_chunked_legal_ows_before_value(codec):
    data = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n"
    events, _, _ = run(codec, data)
    assert events[0][8] == BODY_CHUNKED and events[1] == END


def test_expect_continue(codec):
    data = b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n"
    events, _, _ = run(codec, data)
    assert events[0][11] is True
    events, _, _ = run(codec, data.replace(b"HTTP/1.1", b"HTTP/1.0"))
    assert events[0][11] is False      # RFC 9110 10.1.1: ignored in HTTP/1.0
    events, _, _ = run(codec, data.replace(b"100-Continue", b"something-else"))
    assert events[0][11] is False and (b"expect", b"something-else") in events[0][5]


def test_upgrade_returns_rest(codec):
    data = (b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n"
            b"\x81\x05hello GET / HTTP/1.1\r\n")
    events, rest, _ = run(codec, data)
    assert events[0][10] == b"websocket" and events[1] == END
    assert rest == b"\x81\x05hello GET / HTTP/1.1\r\n"
    events, rest, _ = run(codec, data[:data.index(b"\x81")])      # nothing after the head
    assert rest == b""


def test_upgrade_with_body_returns_rest_after_body(codec):
    data = (b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\nContent-Length: 3\r\n\r\n"
            b"abcPRI * HTTP/2.0")
    events, rest, _ = run(codec, data)
    assert events[1:] == [("data", b"abc"), END]
    assert rest == b"PRI * HTTP/2.0"


def test_upgrade_header_without_connection_option_is_not_an_upgrade(codec):
    data = b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"
    events, rest, _ = run(codec, data)
    assert events[0][10] is None and rest is None and len(events) == 4


def test_feed_after_switch_is_refused(codec):
    sink = Recorder()
    parser = make_parser(codec, "request", sink, LIMITS)
    assert parser.feed(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n") == b""
    with pytest.raises(RuntimeError):
        parser.feed(b"more")


def test_connect(codec):
    data = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01"
    events, rest, _ = run(codec, data)
    assert events == [req(b"CONNECT", b"example.com:443", [(b"host", b"example.com:443")], path=b"",
                          framing=BODY_TUNNEL, authority=b"example.com:443"), END]
    assert rest == b"\x16\x03\x01"


def test_absolute_form_overrides_host(codec):
    data = b"GET http://Backend:8080/p/q?r HTTP/1.1\r\nHost: ignored\r\n\r\n"
    events, _, _ = run(codec, data)
    assert events[0][2:5] == (b"http://Backend:8080/p/q?r", b"/p/q", b"Backend:8080")
    events, _, _ = run(codec, b"GET http://b?x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert events[0][3:5] == (b"/", b"b")


def test_options_asterisk(codec):
    events, _, _ = run(codec, b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
    assert events[0][1:4] == (b"OPTIONS", b"*", b"*")


def test_leading_empty_lines_are_skipped(codec):
    events, _, _ = run(codec, b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [e[2] for e in events if e[0] == "request"] == [b"/", b"/2"]


def test_empty_host_is_allowed(codec):
    events, _, _ = run(codec, b"GET / HTTP/1.1\r\nHost:\r\n\r\n")
    assert events[0][4] == b""


def test_feed_eof(codec):
    assert run(codec, WRK_GET, eof=True)[2] is True
    assert run(codec, WRK_GET + b"\r\n", eof=True)[2] is True
    assert run(codec, WRK_GET[:-2], eof=True)[2] is False
    assert run(codec, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\na", eof=True)[2] is False
    assert run(codec, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n",
               eof=True)[2] is False


def test_dead_after_error(codec):
    sink = Recorder()
    parser = make_parser(codec, "request", sink, LIMITS)
    with pytest.raises(HttpError) as first:
        parser.feed(WRK_GET + b"GET / HTTP/1.1\r\n\r\n")
    assert first.value.status == 400 and first.value.flag == FLAG_DOWNSTREAM_PROTOCOL_ERROR
    assert [e[0] for e in sink.events] == ["request", "end"]   # the valid request came first
    with pytest.raises(HttpError):
        parser.feed(WRK_GET)
    assert parser.feed_eof() is False


# -- responses ------------------------------------------------------------------

NGINX = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.24.0\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
         b"Content-Type: text/html\r\nContent-Length: 12\r\nConnection: keep-alive\r\n"
         b"ETag: \"6434bbbe-c\"\r\nAccept-Ranges: bytes\r\n\r\nhello world\n")


def test_simple_response(codec):
    events, rest, clean = run(codec, NGINX, "response", methods=[b"GET"], eof=True)
    assert events[0][:3] == ("response", 200, b"OK")
    assert events[0][4:] == (b"1.1", True, BODY_LENGTH, 12)
    assert (b"etag", b"\"6434bbbe-c\"") in events[0][3]
    assert events[1:] == [("data", b"hello world\n"), END]
    assert rest is None and clean is True


def test_head_response_has_no_body(codec):
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    events, _, _ = run(codec, data, "response", methods=[b"HEAD", b"GET"])
    assert events == [resp(200, b"OK", [(b"content-length", b"100")]), END,
                      resp(200, b"OK", [(b"content-length", b"2")], framing=BODY_LENGTH, length=2),
                      ("data", b"ok"), END]


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(codec, status):
    line = b"HTTP/1.1 %d X\r\n" % status
    data = line + b"Content-Length: 7\r\n\r\n" + line + b"Transfer-Encoding: chunked\r\n\r\n"
    events, _, clean = run(codec, data, "response", methods=[b"GET", b"GET"], eof=True)
    assert [e[6] if e[0] == "response" else e for e in events] == [BODY_NONE, END, BODY_NONE, END]
    assert clean is True


def test_informational_responses(codec):
    data = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
            b"HTTP/1.1 102 Processing\r\nContent-Length: 3\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    events, _, clean = run(codec, data, "response", methods=[b"POST"], eof=True)
    assert events == [resp(100, b"Continue", []), resp(103, b"Early Hints", [(b"link", b"</s.css>")]),
                      resp(102, b"Processing", [(b"content-length", b"3")]),
                      resp(201, b"Created", [(b"content-length", b"0")]), END]
    assert clean is True


def test_informational_then_eof_is_not_clean(codec):
    assert run(codec, b"HTTP/1.1 100 Continue\r\n\r\n", "response", methods=[b"GET"], eof=True)[2] is False


def test_101_switches(codec):
    data = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x00"
    events, rest, _ = run(codec, data, "response", methods=[b"GET"])
    assert events == [resp(101, b"Switching Protocols", [(b"connection", b"Upgrade"), (b"upgrade", b"websocket")],
                           keep_alive=False, framing=BODY_TUNNEL)]
    assert rest == b"\x81\x00"


def test_connect_2xx_switches_and_non_2xx_does_not(codec):
    events, rest, _ = run(codec, b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03", "response",
                          methods=[b"CONNECT"])
    assert events == [resp(200, b"Connection established", [], keep_alive=False, framing=BODY_TUNNEL)]
    assert rest == b"\x16\x03"
    data = b"HTTP/1.1 407 Proxy Auth\r\nContent-Length: 2\r\n\r\nno"
    events, rest, _ = run(codec, data, "response", methods=[b"CONNECT"])
    assert events[1:] == [("data", b"no"), END] and rest is None


def test_until_close(codec):
    data = b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nall of this, until the end"
    for pieces in (None, 1, 5):
        events, rest, clean = run(codec, data, "response", pieces=pieces, methods=[b"GET"], eof=True)
        assert events == [resp(200, b"OK", [(b"server", b"old")], version=b"1.0", keep_alive=False,
                               framing=BODY_UNTIL_CLOSE), ("data", b"all of this, until the end"), END]
        assert clean is True


def test_response_transfer_codings_before_chunked(codec):
    data = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\n\x1f\x8b\x08\r\n0\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    events, _, _ = run(codec, data, "response", methods=[b"GET", b"GET"])
    assert events[0] == resp(200, b"OK", [(b"transfer-encoding", b"gzip, chunked")], framing=BODY_CHUNKED)
    assert events[1:3] == [("data", b"\x1f\x8b\x08"), END]
    assert events[3][6] == BODY_CHUNKED and events[4] == END


def test_response_without_reason(codec):
    events, _, _ = run(codec, b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\nHTTP/1.1 204 \r\n\r\n",
                       "response", methods=[b"GET", b"GET"])
    assert [e[1:3] for e in events if e[0] == "response"] == [(200, b""), (204, b"")]


def test_response_eof_without_answer(codec):
    assert run(codec, b"", "response", methods=[b"GET"], eof=True)[2] is False
    assert run(codec, b"", "response", eof=True)[2] is True
    assert run(codec, NGINX[:-3], "response", methods=[b"GET"], eof=True)[2] is False


# -- every valid case: one feed == byte by byte == random pieces == the other codec

VALID_REQUESTS = [
    WRK_GET,
    b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\nGET /3 HTTP/1.0\r\n\r\n",
    b"POST /f HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\nhello world",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;a=b\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: 1\r\nU:2\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nX: a b  c \r\n\r\n",
    b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
    b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
    b"CONNECT a.b:443 HTTP/1.1\r\nHost: a.b:443\r\nProxy-Authorization: basic x\r\n\r\n\x16\x03\x01\x00",
    b"GET http://[::1]:8080/p?q HTTP/1.1\r\nHost: x\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"DELETE /r HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\t\r\n\r\n0\r\n\r\n",   # llhttp refuses it
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Obs: \x80\xff\r\nCookie: a=b; c=d\r\nCookie: e=f\r\n\r\n",
    b"M-SEARCH * HTTP/1.1\r\nHost: a\r\n\r\n".replace(b"*", b"/m"),
    b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"2\r\nab\r\n0\r\n\r\nPRI",
]

VALID_RESPONSES = [
    (NGINX, [b"GET"]),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: v\r\n\r\n", [b"GET"]),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", [b"POST"]),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nHTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n", [b"HEAD", b"GET"]),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nframes", [b"GET"]),
    (b"HTTP/1.1 200 OK\r\n\r\ntunnel bytes", [b"CONNECT"]),
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\nno Upgrade field", [b"GET"]),
    (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close", [b"GET"]),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nzz\r\n0\r\n\r\n", [b"GET"]),
    (b"\r\nHTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", [b"DELETE"]),
]


def _random_pieces(data, seed):
    rng = random.Random(seed)
    pieces, left = [], len(data)
    while left > 0:
        size = rng.randint(1, 9)
        pieces.append(size)
        left -= size
    return pieces


@pytest.mark.parametrize("data", VALID_REQUESTS, ids=range(len(VALID_REQUESTS)))
def test_valid_requests_any_segmentation(codec, data):
    whole = run(codec, data, eof=True)
    assert whole[0], "no events"
    assert run(codec, data, pieces=1, eof=True) == whole
    for seed in range(3):
        assert run(codec, data, pieces=_random_pieces(data, seed), eof=True) == whole
    assert run(other(codec), data, eof=True) == whole


@pytest.mark.parametrize("data, methods", VALID_RESPONSES, ids=range(len(VALID_RESPONSES)))
def test_valid_responses_any_segmentation(codec, data, methods):
    whole = run(codec, data, "response", methods=methods, eof=True)
    assert whole[0], "no events"
    assert run(codec, data, "response", pieces=1, methods=methods, eof=True) == whole
    for seed in range(3):
        assert run(codec, data, "response", pieces=_random_pieces(data, seed), methods=methods,
                   eof=True) == whole
    assert run(other(codec), data, "response", methods=methods, eof=True) == whole


# -- malformed input: the same status from both codecs --------------------------

H = b"Host: a\r\n"
POST = b"POST / HTTP/1.1\r\nHost: a\r\n"
TE = POST + b"Transfer-Encoding: chunked\r\n\r\n"

BAD_REQUESTS = [
    # request smuggling: CL.TE, TE.CL, TE.TE obfuscations
    ("CL.TE", POST + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("TE.CL", POST + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", 400),
    ("TE list then CL", POST + b"Transfer-Encoding: gzip, chunked\r\nContent-Length: 4\r\n\r\n", 400),
    ("TE space before colon", POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    ("TE xchunked", POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 501),
    ("TE chunked then x", POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n", 501),
    ("TE gzip, chunked", POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    ("TE chunked, gzip", POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 501),
    ("TE identity", POST + b"Transfer-Encoding: identity\r\n\r\n", 501),
    ("TE chunked, chunked", POST + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 501),
    ("TE repeated fields", POST + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    ("TE empty", POST + b"Transfer-Encoding: \r\n\r\n", 501),
    ("TE chunked,", POST + b"Transfer-Encoding: chunked,\r\n\r\n0\r\n\r\n", 501),
    ("TE empty element", POST + b"Transfer-Encoding: , chunked\r\n\r\n0\r\n\r\n", 501),
    ("TE folded", POST + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),   # the fold is the fault
    ("TE in HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("CL twice equal", POST + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\nx", 400),
    ("CL list", POST + b"Content-Length: 1,1\r\n\r\nx", 400),
    ("CL list spaced", POST + b"Content-Length: 1, 1\r\n\r\nx", 400),
    ("CL negative", POST + b"Content-Length: -1\r\n\r\nx", 400),
    ("CL plus", POST + b"Content-Length: +1\r\n\r\nx", 400),
    ("CL empty", POST + b"Content-Length: \r\n\r\nx", 400),
    ("CL hex", POST + b"Content-Length: 0x10\r\n\r\nx", 400),
    ("CL 19 digits", POST + b"Content-Length: 0000000000000000001\r\n\r\nx", 400),
    ("CL inner space", POST + b"Content-Length: 1 2\r\n\r\nx", 400),
    # chunk lines
    ("chunk 0x10", TE + b"0x10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n", 400),
    ("chunk +10", TE + b"+10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n", 400),
    ("chunk -1", TE + b"-1\r\nx\r\n0\r\n\r\n", 400),
    ("chunk leading space", TE + b" 10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n", 400),
    ("chunk space before ext", TE + b"10 ;a=b\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n", 400),
    ("chunk trailing space", TE + b"10 \r\n" + b"x" * 16 + b"\r\n0\r\n\r\n", 400),
    ("chunk 17 digits", TE + b"00000000000000001\r\nx\r\n0\r\n\r\n", 400),
    ("chunk huge", TE + b"fffffffffffffffff\r\nx\r\n0\r\n\r\n", 400),
    ("chunk empty size", TE + b"\r\nx\r\n0\r\n\r\n", 400),
    ("chunk ext NUL", TE + b"1;a\x00\r\nx\r\n0\r\n\r\n", 400),
    ("chunk ext bare CR", TE + b"1;a\rb\r\nx\r\n0\r\n\r\n", 400),
    ("chunk ext empty", TE + b"1;\r\nx\r\n0\r\n\r\n", 400),
    ("chunk ext empty value", TE + b"1;a=\r\nx\r\n0\r\n\r\n", 400),
    ("chunk ext unterminated quote", TE + b"1;a=\"b\r\nx\r\n0\r\n\r\n", 400),
    ("chunk size bare LF", TE + b"1\nx\r\n0\r\n\r\n", 400),
    ("chunk data without CRLF", TE + b"1\r\nxy\r\n0\r\n\r\n", 400),
    ("chunk data bare LF", TE + b"1\r\nx\n0\r\n\r\n", 400),
    ("trailer obs-fold", TE + b"0\r\nT: 1\r\n 2\r\n\r\n", 400),
    ("trailer bare LF", TE + b"0\r\nT: 1\n\r\n", 400),
    ("trailer CL", TE + b"0\r\nContent-Length: 5\r\n\r\n", 400),
    ("trailer NUL", TE + b"0\r\nT: a\x00\r\n\r\n", 400),
    # field lines
    ("NUL in value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    ("bare CR in value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
    ("CTL in value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", 400),
    ("DEL in value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n", 400),
    ("bare LF line ends", b"GET / HTTP/1.1\nHost: a\n\n", 400),
    ("bare LF after field", b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400),
    ("bare LF empty line", b"GET / HTTP/1.1\r\nHost: a\r\n\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
    ("obs-fold tab", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n\tb\r\n\r\n", 400),
    ("fold after request line", b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", 400),
    ("space before colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    ("tab before colon", b"GET / HTTP/1.1\r\nHost\t: a\r\n\r\n", 400),
    ("space in name", b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n", 400),
    ("empty name", b"GET / HTTP/1.1\r\nHost: a\r\n: v\r\n\r\n", 400),
    ("separator in name", b"GET / HTTP/1.1\r\nHost: a\r\nX(y): v\r\n\r\n", 400),
    ("no colon", b"GET / HTTP/1.1\r\nHost: a\r\nJunk\r\n\r\n", 400),
    # request line
    ("HTTP/0.9 simple request", b"GET /\r\n\r\n", 400),
    ("HTTP/0.9 version", b"GET / HTTP/0.9\r\n\r\n", 400),
    ("HTTP/2.0 over h1", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),
    ("h2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    ("lowercase version", b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
    ("RTSP version", b"GET / RTSP/1.0\r\nHost: a\r\n\r\n", 400),
    ("version junk", b"GET / HTTP/1.x\r\nHost: a\r\n\r\n", 400),
    ("space in target", b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("double space", b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("double space before version", b"GET /  HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("no target", b"GET  HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("space after version", b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 400),
    ("tab separator", b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("leading space", b" GET / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("unknown method", b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n", 501),
    ("lowercase method", b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 501),
    ("non-token method", b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("DEL in target", b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("obs-text in target", b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("CTL in target", b"GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("fragment", b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("relative target", b"GET a/b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("asterisk with GET", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("absolute userinfo", b"GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("absolute empty host", b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("absolute bad port", b"GET http://a:x/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("CONNECT origin-form", b"CONNECT /x HTTP/1.1\r\nHost: a:1\r\n\r\n", 400),
    ("CONNECT without port", b"CONNECT a HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("CONNECT with body", b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\nContent-Length: 1\r\n\r\nx", 400),
    ("bare LF before request", b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("bare CR before request", b"\rGET / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    # Host
    ("no Host", b"GET / HTTP/1.1\r\nX: y\r\n\r\n", 400),
    ("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("two Hosts equal", b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),
    ("Host with path", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    ("Host with userinfo", b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", 400),
    ("Host with space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    ("Host bad port", b"GET / HTTP/1.1\r\nHost: a:8x\r\n\r\n", 400),
    # limits
    ("9 KiB URI", b"GET /" + b"a" * 9 * 1024 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    ("61 KiB head", b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Big: " + b"v" * 61 * 1024 + b"\r\n\r\n", 431),
    ("61 KiB of fields", b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(
        b"X-%02d: %s\r\n" % (i, b"v" * 990) for i in range(62)) + b"\r\n", 431),
    ("101 fields", b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(100)) + H + b"\r\n", 431),
]


@pytest.mark.parametrize("name, data, status", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests(codec, name, data, status):
    exc = error(codec, data)
    assert (exc.status, exc.flag) == (status, FLAG_DOWNSTREAM_PROTOCOL_ERROR), exc.detail
    # the same answer when the bytes trickle in
    pieces = 1024 if len(data) > 4096 else 1
    exc = error(codec, data, pieces=pieces)
    assert exc.status == status, exc.detail


S = b"HTTP/1.1 200 OK\r\n"
SC = S + b"Transfer-Encoding: chunked\r\n\r\n"

BAD_RESPONSES = [
    ("status 4 digits", b"HTTP/1.1 2000 OK\r\n\r\n"),
    ("status 2 digits", b"HTTP/1.1 20 OK\r\n\r\n"),
    ("status 099", b"HTTP/1.1 099 X\r\n\r\n"),
    ("status 600", b"HTTP/1.1 600 X\r\nContent-Length: 0\r\n\r\n"),
    ("HTTP/2.0", b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ("HTTP/0.9", b"HTTP/0.9 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ("ICY", b"ICY 200 OK\r\n\r\n"),
    ("RTSP", b"RTSP/1.0 200 OK\r\n\r\n"),
    ("lowercase", b"http/1.1 200 OK\r\n\r\n"),
    ("double space", b"HTTP/1.1  200 OK\r\n\r\n"),
    ("NUL in reason", b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n"),
    ("CTL in reason", b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n"),
    ("CL.TE", S + b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("TE.CL", S + b"Transfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n0\r\n\r\n"),
    ("TE final not chunked", S + b"Transfer-Encoding: chunked, gzip\r\n\r\nabc"),
    ("TE gzip only", S + b"Transfer-Encoding: gzip\r\n\r\nabc"),
    ("TE after chunked", S + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\nabc"),
    ("TE empty", S + b"Transfer-Encoding: \r\n\r\n"),
    ("TE in HTTP/1.0", b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("CL twice", S + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\nx"),
    ("CL list", S + b"Content-Length: 1,1\r\n\r\nx"),
    ("CL negative", S + b"Content-Length: -1\r\n\r\n"),
    ("CL 19 digits", S + b"Content-Length: 0000000000000000001\r\n\r\nx"),
    ("NUL in value", S + b"X: a\x00\r\nContent-Length: 0\r\n\r\n"),
    ("obs-fold", S + b"X: a\r\n b\r\nContent-Length: 0\r\n\r\n"),
    ("bare LF", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"),
    ("space before colon", S + b"Content-Length : 0\r\n\r\n"),
    ("chunk 0x", SC + b"0x1\r\nx\r\n0\r\n\r\n"),
    ("chunk 17 digits", SC + b"00000000000000001\r\nx\r\n0\r\n\r\n"),
    ("chunk ext bad", SC + b"1;a b\r\nx\r\n0\r\n\r\n"),
    ("chunk data without CRLF", SC + b"1\r\nxy0\r\n\r\n"),
    ("trailer CL", SC + b"0\r\nContent-Length: 1\r\n\r\n"),
    ("61 KiB head", S + b"X: " + b"v" * 61 * 1024 + b"\r\n\r\n"),
    ("101 fields", S + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n"),
]


@pytest.mark.parametrize("name, data", BAD_RESPONSES, ids=[c[0] for c in BAD_RESPONSES])
def test_bad_responses(codec, name, data):
    for pieces in (None, 1024 if len(data) > 4096 else 1):
        exc = error(codec, data, "response", pieces=pieces)
        assert (exc.status, exc.flag) == (502, FLAG_UPSTREAM_PROTOCOL_ERROR), exc.detail


def test_malformed_table_is_large_enough():
    assert len(BAD_REQUESTS) + len(BAD_RESPONSES) >= 50


# -- limits: every one has a number and a test ----------------------------------

def _head_of_size(size, extra=b""):
    """A request head of exactly ``size`` bytes."""
    base = b"GET / HTTP/1.1\r\nHost: a\r\n" + extra + b"X-Pad: \r\n\r\n"
    return base.replace(b"X-Pad: ", b"X-Pad: " + b"p" * (size - len(base)))


@pytest.mark.parametrize("pieces", [None, 1024, 1])
def test_header_bytes_limit(codec, pieces):
    limits = Limits(max_header_bytes=2048)
    ok = _head_of_size(2048)
    assert len(ok) == 2048
    assert run(codec, ok, pieces=pieces, limits=limits)[0][-1] == END
    assert error(codec, _head_of_size(2049), pieces=pieces, limits=limits).status == 431


def test_header_bytes_limit_fails_before_the_end(codec):
    """An incomplete head over the limit fails at once, in one feed or in pieces."""
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 61 * 1024
    assert error(codec, head).status == 431
    sink = Recorder()
    parser = make_parser(codec, "request", sink, LIMITS)
    with pytest.raises(HttpError) as info:
        for i in range(0, len(head), 1024):
            parser.feed(head[i:i + 1024])
    assert info.value.status == 431
    assert i <= LIMITS.max_header_bytes + 1024


def test_header_bytes_limit_pipelined(codec):
    """The limit applies to each head, not to what a feed happens to hold."""
    limits = Limits(max_header_bytes=1024)
    body = b"b" * 4000
    data = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4000\r\n\r\n" + body + _head_of_size(1024)
    assert [e[0] for e in run(codec, data, limits=limits)[0]] == ["request", "data", "end", "request", "end"]
    assert run(codec, data[:-10], limits=limits)[0][-1] == END     # next head incomplete, still fine
    assert error(codec, data[:-24] + b"x" * 20 + data[-24:], limits=limits).status == 431


@pytest.mark.parametrize("pieces", [None, 7])
def test_header_count_limit(codec, pieces):
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(99))
    ok = b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n"
    assert run(codec, ok, pieces=pieces)[0][0][5][-1] == (b"x-98", b"v")
    assert error(codec, ok.replace(b"\r\n\r\n", b"\r\nX-Last: v\r\n\r\n"), pieces=pieces).status == 431
    # an incomplete head with too many fields fails before its end
    assert error(codec, ok[:-2] + b"X-Last: v\r\nX-More").status == 431


@pytest.mark.parametrize("pieces", [None, 1000, 1])
def test_uri_limit(codec, pieces):
    ok = b"GET /" + b"u" * (LIMITS.max_uri_bytes - 1) + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    assert run(codec, ok, pieces=pieces)[0][-1] == END
    too_long = ok.replace(b"/u", b"/uu", 1)
    assert error(codec, too_long, pieces=pieces).status == 414
    # before the request line ends
    assert error(codec, too_long[:LIMITS.max_uri_bytes + 10], pieces=pieces).status == 414


def test_chunk_line_limit(codec):
    line = b"1;e=" + b"x" * (MAX_CHUNK_LINE_BYTES - 4)
    assert len(line) == MAX_CHUNK_LINE_BYTES
    assert run(codec, TE.replace(b"\r\n\r\n", b"\r\n\r\n" + line + b"\r\nz\r\n0\r\n\r\n", 1))[0][-1] == END
    assert error(codec, TE + line + b"x\r\nz\r\n0\r\n\r\n").status == 400
    assert error(codec, TE + line + b"x", pieces=512).status == 400      # before its CRLF


def test_trailer_limits(codec):
    limits = Limits(max_header_bytes=512, max_header_count=5)
    five = b"".join(b"T-%d: v\r\n" % i for i in range(5))
    assert run(codec, TE + b"0\r\n" + five + b"\r\n", limits=limits)[0][-1][1][-1] == (b"t-4", b"v")
    assert error(codec, TE + b"0\r\n" + five + b"T-5: v\r\n\r\n", limits=limits).status == 431
    assert error(codec, TE + b"0\r\nT: " + b"v" * 600 + b"\r\n\r\n", limits=limits).status == 431
    assert error(codec, TE + b"0\r\nT: " + b"v" * 600, pieces=100, limits=limits).status == 431


def test_response_limits(codec):
    limits = Limits(max_header_bytes=1024, max_header_count=3)
    head = S + b"A: 1\r\nB: 2\r\nC: 3\r\n\r\n"
    assert run(codec, head, "response", methods=[b"GET"], limits=limits)[0][0][1] == 200
    for data in (S + b"A: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n", S + b"X: " + b"v" * 1024 + b"\r\n\r\n",
                 S + b"X: " + b"v" * 1024):
        assert error(codec, data, "response", limits=limits).status == 502
