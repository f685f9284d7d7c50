import random
import ssl
import struct

import pytest

from sidecar_proxy.transport.detect import (HTTP1_METHODS, HTTP2_PREFACE, MAX_REQUEST_LINE, MAX_SNIFF_BYTES,
                                            Detection, Proto, sniff)

METHODS = sorted(m.decode() for m in HTTP1_METHODS)


# --- building ClientHellos --------------------------------------------------------------------


def real_client_hello(server_hostname="api.example.com", alpn=("h2", "http/1.1"), max_version=None) -> bytes:
    """The first flight of Python's ssl module (OpenSSL), captured through a MemoryBIO."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.maximum_version = max_version
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


def ext(ext_type: int, body: bytes) -> bytes:
    return struct.pack("!HH", ext_type, len(body)) + body


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(struct.pack("!BH", name_type, len(n)) + n for n in names)
    return ext(0, struct.pack("!H", len(entries)) + entries)


def alpn_ext(*protocols: bytes) -> bytes:
    names = b"".join(bytes([len(p)]) + p for p in protocols)
    return ext(16, struct.pack("!H", len(names)) + names)


def hello_body(extensions: bytes | None, session_id: bytes = bytes(32), suites: bytes = b"\x13\x01\xc0\x2f",
               compression: bytes = b"\x00") -> bytes:
    body = (b"\x03\x03" + bytes(range(32)) + bytes([len(session_id)]) + session_id
            + struct.pack("!H", len(suites)) + suites + bytes([len(compression)]) + compression)
    if extensions is not None:
        body += struct.pack("!H", len(extensions)) + extensions
    return body


def handshake(body: bytes, hs_type: int = 1) -> bytes:
    return bytes([hs_type]) + len(body).to_bytes(3, "big") + body


def record(fragment: bytes, version: bytes = b"\x03\x01", content_type: int = 0x16) -> bytes:
    return bytes([content_type]) + version + struct.pack("!H", len(fragment)) + fragment


def synthetic_hello(extensions: bytes | None, **kw) -> bytes:
    return record(handshake(hello_body(extensions, **kw)))


def tls(sni=None, alpn=()):
    return Detection(Proto.TLS, sni=sni, alpn=alpn)


def pieces(data: bytes, chunk: int = 97):
    """Growing prefixes: byte by byte for the first 10 bytes, then in chunks."""
    ends = list(range(1, min(10, len(data)) + 1)) + list(range(10 + chunk, len(data), chunk)) + [len(data)]
    return [data[:e] for e in sorted(set(ends))]


# --- TLS: real ClientHellos ---------------------------------------------------------------------


@pytest.mark.parametrize("max_version", [None, ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_real_client_hello_gives_sni_and_alpn(max_version):
    hello = real_client_hello(max_version=max_version)
    assert sniff(hello) == tls("api.example.com", ("h2", "http/1.1"))


def test_tls12_and_tls13_hellos_differ_but_detect_alike():
    hello12 = real_client_hello(max_version=ssl.TLSVersion.TLSv1_2)
    hello13 = real_client_hello()
    assert hello12 != hello13
    assert b"\x00\x2b" in hello13  # supported_versions: it really is a 1.3 hello
    assert sniff(hello12) == sniff(hello13)


def test_client_hello_without_server_hostname_has_no_sni():
    assert sniff(real_client_hello(server_hostname=None)) == tls(None, ("h2", "http/1.1"))


def test_client_hello_to_an_ip_address_has_no_sni():
    # OpenSSL sends no server_name for an IP literal (RFC 6066 forbids it).
    assert sniff(real_client_hello(server_hostname="127.0.0.1")).sni is None


def test_client_hello_without_alpn():
    assert sniff(real_client_hello(alpn=())) == tls("api.example.com", ())


def test_client_hello_with_one_alpn_protocol():
    assert sniff(real_client_hello(alpn=("http/1.1",))).alpn == ("http/1.1",)


@pytest.mark.parametrize("max_version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_hello_in_pieces_is_undecided_until_complete(max_version):
    hello = real_client_hello(max_version=max_version)
    whole = sniff(hello)
    for part in pieces(hello)[:-1]:
        assert sniff(part) is None, len(part)
    assert sniff(hello) == whole
    # What follows the record (the rest of a flight, early data) changes nothing.
    assert sniff(hello + b"\x17\x03\x03\x00\x05hello") == whole


def test_bytearray_and_memoryview_are_accepted():
    hello = real_client_hello()
    assert sniff(bytearray(hello)) == sniff(memoryview(hello)) == sniff(hello)
    line = b"GET / HTTP/1.1\r\n"
    assert sniff(bytearray(line)) == sniff(memoryview(line)) == Detection(Proto.HTTP1, detail="GET")


def test_client_hello_spanning_two_records_is_parsed_up_to_the_first_records_end():
    hello = real_client_hello()
    message = hello[5:]
    name, protocols = b"api.example.com", b"\x08http/1.1"
    sni_end = message.index(name) + len(name)  # the host name ends its extension
    alpn_end = message.index(protocols) + len(protocols)
    for split in range(1, len(message)):
        data = record(message[:split]) + record(message[split:])
        found = sniff(data)
        assert found.proto is Proto.TLS, split
        assert found.detail == "ClientHello continues past the first record", split
        assert found.sni == ("api.example.com" if split >= sni_end else None), split
        assert found.alpn == (("h2", "http/1.1") if split >= alpn_end else ()), split
        # The first record alone is enough to decide.
        assert sniff(data[: 5 + split]) == found


# --- TLS: synthetic and malformed ClientHellos -------------------------------------------------


def test_synthetic_hello_sni_is_lower_cased():
    assert sniff(synthetic_hello(sni_ext(b"API.Example.COM"))) == tls("api.example.com")


def test_synthetic_hello_extensions_in_any_order():
    data = synthetic_hello(ext(0x0A0A, b"") + alpn_ext(b"h2") + ext(43, b"\x02\x03\x04") + sni_ext(b"a.b"))
    assert sniff(data) == tls("a.b", ("h2",))


def test_hello_without_extensions_is_tls_without_sni():
    found = sniff(synthetic_hello(None))
    assert found.proto is Proto.TLS and found.sni is None and found.alpn == ()


def test_other_name_types_are_skipped():
    entries = struct.pack("!BH", 7, 3) + b"xyz" + struct.pack("!BH", 0, 3) + b"a.b"
    assert sniff(synthetic_hello(ext(0, struct.pack("!H", len(entries)) + entries))).sni == "a.b"


def test_alpn_names_are_kept_byte_exact():
    assert sniff(synthetic_hello(alpn_ext(b"\xff\x00x", b"h2"))).alpn == ("\xff\x00x", "h2")


def malformed(extensions: bytes | None = None, body: bytes | None = None) -> bytes:
    return record(handshake(body if body is not None else hello_body(extensions)))


MALFORMED = {
    "empty server_name extension": malformed(ext(0, b"")),
    "empty server_name list": malformed(ext(0, b"\x00\x00")),
    "zero-length host_name": malformed(sni_ext(b"")),
    "host_name with NUL": malformed(sni_ext(b"evil.com\x00.good.com")),
    "host_name not ASCII": malformed(sni_ext("bücher.de".encode())),
    "host_name with a space": malformed(sni_ext(b"a b")),
    "host_name too long": malformed(sni_ext(b"a" * 256)),
    "two host_names": malformed(sni_ext(b"a.com", b"b.com")),
    "no host_name entry": malformed(sni_ext(b"a.com", name_type=1)),
    "server_name list longer than extension": malformed(ext(0, b"\x00\x10\x00\x00\x03a.b")),
    "server_name list shorter than extension": malformed(ext(0, b"\x00\x01\x00\x00\x03a.b")),
    "host_name length past the list": malformed(ext(0, b"\x00\x06\x00\x00\x09a.b")),
    "server_name entry header cut": malformed(ext(0, b"\x00\x02\x00\x00")),
    "duplicate server_name": malformed(sni_ext(b"a.com") + sni_ext(b"b.com")),
    "duplicate ALPN": malformed(sni_ext(b"a.com") + alpn_ext(b"h2") + alpn_ext(b"http/1.1")),
    "empty ALPN list": malformed(sni_ext(b"a.com") + ext(16, b"\x00\x00")),
    "empty ALPN name": malformed(sni_ext(b"a.com") + ext(16, b"\x00\x01\x00")),
    "ALPN name past the list": malformed(sni_ext(b"a.com") + ext(16, b"\x00\x03\x05h2x")),
    "ALPN list length mismatch": malformed(sni_ext(b"a.com") + ext(16, b"\x00\x09\x02h2")),
    "extension length past the end": malformed(body=hello_body(sni_ext(b"a.com"))[:-1] + b"\x00\x00\x00"),
    "extensions truncated": malformed(body=hello_body(sni_ext(b"a.com") + alpn_ext(b"h2"))[:-4]),
    "extensions length past the end": malformed(body=hello_body(b"")[:-2] + b"\x00\x40" + sni_ext(b"a.com")),
    "bytes after the extensions": malformed(body=hello_body(sni_ext(b"a.com")) + b"\x00"),
    "extension header cut": malformed(body=hello_body(sni_ext(b"a.com") + b"\x00\x10")),
    "session id too long": malformed(body=hello_body(sni_ext(b"a.com"), session_id=bytes(33))),
    "session id past the end": malformed(body=b"\x03\x03" + bytes(32) + b"\x20" + bytes(10)),
    "odd cipher suites length": malformed(body=hello_body(sni_ext(b"a.com"), suites=b"\x13\x01\x00")),
    "no cipher suites": malformed(body=hello_body(sni_ext(b"a.com"), suites=b"")),
    "cipher suites past the end": malformed(body=b"\x03\x03" + bytes(32) + b"\x00\x01\x00" + bytes(6)),
    "no compression methods": malformed(body=hello_body(sni_ext(b"a.com"), compression=b"")),
    "compression past the end": malformed(body=b"\x03\x03" + bytes(32) + b"\x00\x00\x02\x13\x01\x05\x00"),
    "empty ClientHello": malformed(body=b""),
    "only a version": malformed(body=b"\x03\x03"),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_client_hello_is_tls_without_sni(data):
    found = sniff(data)
    assert found.proto is Proto.TLS
    assert found.sni is None and found.alpn == ()
    assert found.detail.startswith("malformed ClientHello: "), found.detail


def test_malformed_detail_names_the_problem():
    assert sniff(MALFORMED["zero-length host_name"]).detail == "malformed ClientHello: empty host_name"
    assert sniff(MALFORMED["duplicate server_name"]).detail == "malformed ClientHello: duplicate server_name extension"
    assert "extensions" in sniff(MALFORMED["extensions truncated"]).detail


def test_record_longer_than_the_tls_limit_is_decided_at_once():
    data = b"\x16\x03\x01\x40\x01\x01\x00\x40\x00"
    found = sniff(data)
    assert found.proto is Proto.TLS and found.sni is None and "exceeds" in found.detail


def test_handshake_header_split_across_records():
    data = record(b"\x01\x00") + record(b"\x02\x00" + bytes(0x200))
    assert sniff(data) == Detection(Proto.TLS, detail="ClientHello continues past the first record")


def test_every_truncation_of_a_real_hello_inside_a_consistent_record_is_tls():
    """Cut the ClientHello body anywhere but keep the record and handshake lengths honest."""
    body = real_client_hello()[9:]
    for cut in range(len(body)):
        found = sniff(record(handshake(body[:cut])))
        assert found.proto is Proto.TLS, cut
        assert found.sni is None, cut  # the extensions block is last, so any cut breaks it


def test_random_corruption_of_a_real_hello_is_still_tls():
    rng = random.Random(20240601)
    hello = bytearray(real_client_hello())
    for _ in range(3000):
        data = bytearray(hello)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(6, len(data))] = rng.randrange(256)  # keep record header and type
        found = sniff(bytes(data))
        assert isinstance(found, Detection) and found.proto is Proto.TLS
        assert found.sni in (None, "api.example.com") or found.sni.isascii()


@pytest.mark.parametrize("data, detail", [
    (record(handshake(b"\x03\x03" + bytes(40), hs_type=2)), "not a TLS ClientHello"),  # a ServerHello
    (b"\x16\x03\x01\x00\x00", "not a TLS ClientHello"),  # empty record
    (b"\x16\x03\x03\x00\x02\x0b\x00", "not a TLS ClientHello"),  # Certificate
    (b"\x16\x02\x00\x00\x10\x01", None),  # not major version 3
    (b"\x16\x01", None),
    (record(b"\x02\x00", content_type=0x15), None),  # an alert
    (record(handshake(hello_body(sni_ext(b"a.b"))), content_type=0x17), None),  # application data
])
def test_tls_records_that_are_not_a_client_hello_are_opaque(data, detail):
    found = sniff(data)
    assert found.proto is Proto.OPAQUE
    if detail:
        assert found.detail == detail


def test_sslv2_style_hello_is_opaque():
    sslv2 = b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + bytes(0x15) + bytes(16)
    assert sniff(sslv2) == Detection(Proto.OPAQUE, detail="SSLv2-style ClientHello")


def test_short_tls_prefixes_are_undecided():
    for data in (b"\x16", b"\x16\x03", b"\x16\x03\x01", b"\x16\x03\x01\x02", b"\x16\x03\x01\x02\x00",
                 b"\x16\x03\x01\x00\x01"):
        assert sniff(data) is None


# --- HTTP/2 prior knowledge ---------------------------------------------------------------------

SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def test_http2_preface():
    assert sniff(HTTP2_PREFACE) == Detection(Proto.HTTP2)
    assert sniff(HTTP2_PREFACE + SETTINGS) == Detection(Proto.HTTP2)


def test_http2_preface_in_pieces():
    data = HTTP2_PREFACE + SETTINGS
    for end in range(1, len(HTTP2_PREFACE)):
        assert sniff(data[:end]) is None, end
    for end in range(len(HTTP2_PREFACE), len(data) + 1):
        assert sniff(data[:end]) == Detection(Proto.HTTP2)


@pytest.mark.parametrize("data", [
    b"PRI * HTTP/1.1\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
    b"PRI / HTTP/1.1\r\n",
    b"PRI * HTTP/2.0\n\nSM\n\n",
])
def test_near_misses_of_the_preface_are_opaque_not_http1(data):
    assert sniff(data).proto is Proto.OPAQUE


# --- HTTP/1 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/1.1"])
@pytest.mark.parametrize("eol", ["\r\n", "\n"])
def test_request_line_for_every_method(method, version, eol):
    target = "example.com:443" if method == "CONNECT" else "*" if method == "OPTIONS" else "/a/b?c=d&e=%20"
    line = f"{method} {target} {version}{eol}".encode()
    assert sniff(line) == Detection(Proto.HTTP1, detail=method)
    assert sniff(line + b"Host: x\r\n\r\n") == Detection(Proto.HTTP1, detail=method)


@pytest.mark.parametrize("line", [
    b"GET http://example.com:8080/path?q=1 HTTP/1.1\r\n",  # absolute-form (forward proxy)
    b"CONNECT example.com:443 HTTP/1.1\r\n",  # authority-form
    b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n",
    b"OPTIONS * HTTP/1.1\r\n",  # asterisk-form
    b"GET /\xc3\xa9t\xc3\xa9 HTTP/1.1\r\n",  # raw UTF-8 in the target: lenient, as servers are
])
def test_request_target_forms(line):
    assert sniff(line).proto is Proto.HTTP1


def test_request_in_pieces():
    data = b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n"
    line_end = data.index(b"\n")
    for end in range(1, line_end + 1):
        assert sniff(data[:end]) is None, data[:end]
    for end in range(line_end + 1, len(data) + 1):
        assert sniff(data[:end]) == Detection(Proto.HTTP1, detail="GET")


@pytest.mark.parametrize("data, detail", [
    (b"GET / HTTP/2.0\r\n", "HTTP version is not 1.0 or 1.1"),
    (b"GET / HTTP/1.2\r\n", "HTTP version is not 1.0 or 1.1"),
    (b"GET / HTTP/2", "HTTP version is not 1.0 or 1.1"),  # decided before the line ends
    (b"GET /\r\n", "no HTTP version in the request line"),  # HTTP/0.9
    (b"GET / \r\n", "no HTTP version in the request line"),
    (b"GET HTTP/1.1\r\n", "no HTTP version in the request line"),
    (b"GET / HTTP/1.10\r\n", "no HTTP version in the request line"),
    (b"GET / http/1.1\r\n", "no HTTP version in the request line"),
    (b"GET / XTTP", "no HTTP version in the request line"),
    (b"GET  / HTTP/1.1\r\n", "invalid request target"),
    (b"GET /a b HTTP/1.1\r\n", "invalid request target"),
    (b"GET /a\x00b HTTP/1.1\r\n", "invalid request target"),
    (b"GET /a\x7f HTTP/1.1\r\n", "invalid request target"),
    (b"GET /a\tb HTTP/1.1\r\n", "invalid request target"),
    (b"GET /a\x01", "invalid request target"),  # decided before the line ends
    (b"GET /a\r", "invalid request target"),
    (b"GET  ", "invalid request target"),
    (b"get / HTTP/1.1\r\n", None),  # methods are case-sensitive
    (b"PROPFIND / HTTP/1.1\r\n", None),  # only the standard methods
    (b"FOO / HTTP/1.1\r\n", None),
    (b"GETS / HTTP/1.1\r\n", "not a standard HTTP/1 method"),
    (b"GET\r\n", None),
    (b"GET / HTTP/1.1\rX", None),
])
def test_not_quite_http1_is_opaque(data, detail):
    found = sniff(data)
    assert found.proto is Proto.OPAQUE, found
    if detail:
        assert found.detail == detail


def test_request_line_limit():
    head = b"GET /"
    tail = b" HTTP/1.1\r\n"
    at_limit = head + b"a" * (MAX_REQUEST_LINE - len(head) - len(tail)) + tail
    assert len(at_limit) == MAX_REQUEST_LINE
    assert sniff(at_limit).proto is Proto.HTTP1
    over = head + b"a" * (MAX_REQUEST_LINE - len(head) - len(tail) + 1) + tail
    assert sniff(over).proto is Proto.OPAQUE


def test_long_target_without_line_end():
    assert sniff(b"GET /" + b"a" * (MAX_REQUEST_LINE - 100)) is None  # may still become a request line
    found = sniff(b"GET /" + b"a" * 9000)
    assert found.proto is Proto.OPAQUE and str(MAX_REQUEST_LINE) in found.detail


def test_method_prefixes_are_undecided():
    for method in METHODS:
        for end in range(1, len(method) + 2):
            assert sniff(f"{method} "[:end].encode()) is None, method[:end]


# --- other protocols ----------------------------------------------------------------------------


OPAQUE = {
    "redis inline": b"PING\r\n",
    "redis RESP": b"*1\r\n$4\r\nPING\r\n",
    "postgres SSLRequest": struct.pack("!II", 8, 80877103),
    "postgres startup": (lambda p: struct.pack("!I", len(p) + 4) + p)(
        struct.pack("!I", 196608) + b"user\x00postgres\x00database\x00app\x00\x00"),
    "mysql handshake response": bytes.fromhex("5500000185a6ff01000000012100") + bytes(23) + b"root\x00",
    "ssh banner": b"SSH-2.0-OpenSSH_9.6\r\n",
    "smtp client": b"HELO example.com\r\n",
    "memcached": b"get key\r\n",
    "mongodb OP_MSG": struct.pack("<iiii", 40, 1, 0, 2013) + bytes(24),
    "kafka": struct.pack("!ihhi", 20, 18, 3, 1) + b"\x00\x06client",
    "nul bytes": bytes(64),
}


@pytest.mark.parametrize("data", OPAQUE.values(), ids=OPAQUE.keys())
def test_other_protocols_are_opaque(data):
    assert sniff(data).proto is Proto.OPAQUE


def test_empty_data_is_undecided():
    assert sniff(b"") is None


def test_only_tls_and_http_first_bytes_wait_for_more():
    waiting = {b for b in range(256) if sniff(bytes([b])) is None}
    assert waiting == {0x16, *b"GHPDCOT"}


def test_random_bytes_never_raise_and_large_inputs_always_decide():
    rng = random.Random(0xD37EC7)
    prefixes = [b"", b"", b"\x16\x03\x01", b"\x16\x03\x03\x00\x80\x01", b"GET ", b"POST /", b"PRI ", b"P", b"\x80"]
    for _ in range(1000):
        size = rng.choice([rng.randrange(0, 16), rng.randrange(0, 600), rng.randrange(0, 2 * MAX_SNIFF_BYTES)])
        data = rng.choice(prefixes) + rng.randbytes(size)
        found = sniff(data)
        assert found is None or isinstance(found, Detection)
        if len(data) >= MAX_SNIFF_BYTES:
            assert found is not None, data[:16]


def test_large_inputs_always_decide_on_every_path():
    big = MAX_SNIFF_BYTES
    for data in (b"\x16\x03\x01\x40\x00\x01" + bytes(big), b"GET /" + b"a" * big, b"PRI " + bytes(big),
                 b"\x16\x03\x01\x40\x00\x01\x00\x40\x00" + bytes(big), bytes(big), b"G" * big):
        assert sniff(data[:big]) is not None
