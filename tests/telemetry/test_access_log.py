"""The access log: both formats, escaping of what the client controls, a writer that never blocks the loop."""
import io
import json
import os
import re
import threading
import time

import pytest

from sidecar_proxy.telemetry.access_log import MAX_FIELD, MAX_PATH, AccessLog, AccessRecord, escape

START = 1_795_000_000.25   # 2026-11-18T11:06:40.250Z
RECORD = AccessRecord(START, b"GET", b"/api/v1/items?id=42", b"HTTP/1.1", 200, "-", 0, 1234, 3.7, 2.2,
                      b"8e1c4d2a-1b2c-4d3e-8f90-000000000001", b"api.shop.svc:8080", "10.0.0.5:8080", "items", "api",
                      "10.0.0.9:51234", "spiffe://mesh.local/ns/shop/sa/web", "0af7651916cd43dd8448eb211c80319c",
                      b"curl/8.5.0", b"10.1.1.1")
JSON_KEYS = ["start_time", "method", "path", "protocol", "status", "response_flags", "bytes_received", "bytes_sent",
             "duration_ms", "upstream_service_time_ms", "x_forwarded_for", "user_agent", "request_id", "authority",
             "upstream_host", "route", "cluster", "downstream_peer", "peer_identity", "trace_id"]
# The text format: every quoted field is "..." with \" and \\ escapes inside, nothing else may contain a quote.
# Groups: 1 time, 2 request line, 3 status, 4 flags, 5 rx, 6 tx, 7 duration, 8 upstream, 9 xff, 10 user agent,
# 11 request id, 12 authority, 13 upstream host, 14 route, 15 cluster, 16 peer, 17 identity, 18 trace id.
_Q = r'"((?:[^"\\]|\\.)*)"'
TEXT_RE = re.compile(r'\[(\S+)\] ' + _Q + r' (\d+) (\S+) (\d+) (\d+) (\d+) (\S+) ' + " ".join([_Q] * 5)
                     + r' (\S+) (\S+) (\S+) ' + _Q + r' (\S+)\n\Z')


def formatted(fmt: str, record) -> bytes:
    log = AccessLog(fmt, io.StringIO())
    try:
        return log._format(record)
    finally:
        log.close()


def collect(fmt: str, records) -> str:
    out = io.StringIO()
    log = AccessLog(fmt, out, flush_interval=0.001)
    for r in records:
        log.log(r)
    log.close()
    return out.getvalue()


def test_text_format_in_the_spirit_of_envoys_default():
    line = formatted("text", RECORD).decode()
    assert line == ('[2026-11-18T11:06:40.250Z] "GET /api/v1/items?id=42 HTTP/1.1" 200 - 0 1234 3 2 "10.1.1.1" '
                    '"curl/8.5.0" "8e1c4d2a-1b2c-4d3e-8f90-000000000001" "api.shop.svc:8080" "10.0.0.5:8080" '
                    'items api 10.0.0.9:51234 "spiffe://mesh.local/ns/shop/sa/web" 0af7651916cd43dd8448eb211c80319c\n')
    assert TEXT_RE.match(line)


def test_missing_values_are_dashes_in_text_and_null_in_json():
    local = AccessRecord(START, b"GET", b"/nope", b"HTTP/1.1", 404, "NR", 0, 9, 0.2, None, None, None, None,
                         None, None, "10.0.0.9:1", None, None)   # 18 fields: user agent and xff default to None
    line = formatted("text", local).decode()
    assert line.endswith('404 NR 0 9 0 - "-" "-" "-" "-" "-" - - 10.0.0.9:1 "-" -\n'), line
    doc = json.loads(formatted("json", local))
    assert doc["upstream_service_time_ms"] is None and doc["trace_id"] is None and doc["route"] is None
    assert doc["user_agent"] is None and doc["response_flags"] == "NR"
    assert doc["duration_ms"] == 0.2


def test_json_format_has_stable_keys_and_types():
    doc = json.loads(formatted("json", RECORD))
    assert list(doc) == JSON_KEYS
    assert doc["start_time"] == "2026-11-18T11:06:40.250Z"
    assert (doc["method"], doc["path"], doc["status"], doc["bytes_sent"]) == ("GET", "/api/v1/items?id=42", 200, 1234)
    assert (doc["duration_ms"], doc["upstream_service_time_ms"]) == (3.7, 2.2)
    assert doc["trace_id"] == "0af7651916cd43dd8448eb211c80319c" and doc["upstream_host"] == "10.0.0.5:8080"
    assert doc["peer_identity"] == "spiffe://mesh.local/ns/shop/sa/web"


def test_a_plain_tuple_is_a_record():
    assert formatted("text", tuple(RECORD)) == formatted("text", RECORD)
    assert formatted("json", tuple(RECORD)[:18]) == formatted("json", RECORD._replace(user_agent=None,
                                                                                       forwarded_for=None))


MALICIOUS = [
    b'/x" 200 - 0 0 0 - "-" "-" "-" "-" "-" - - 1.2.3.4:5 "-" -\n[2026-01-01T00:00:00.000Z] "GET /admin HTTP/1.1',
    b"/a\r\nb", b"/nul\x00byte", b"/back\\slash\\", b"/utf8-\xc3\xa9", b"/bad-\xff\xfe", b"/tab\there", b"/\x1b[31mred",
]


@pytest.mark.parametrize("path", MALICIOUS)
def test_a_malicious_path_cannot_forge_a_text_line(path):
    record = RECORD._replace(path=path, user_agent=b'evil"\n', request_id=b"\\", authority=b"h\x7f")
    out = collect("text", [record, RECORD])
    lines = out.splitlines(keepends=True)
    assert len(lines) == 2, out
    m = TEXT_RE.match(lines[0])
    assert m, lines[0]
    assert out.isascii() and "\r" not in out and "\x00" not in out and "\x1b" not in out
    # The escaped request line reads back to the bytes sent.
    unescaped = re.sub(rb"\\(x[0-9a-f]{2}|.)", lambda e: bytes([int(e.group(1)[1:], 16)]) if len(e.group(1)) == 3
                       else e.group(1), m.group(2).encode())
    assert unescaped == b"GET " + path + b" HTTP/1.1"
    assert m.group(10) == 'evil\\"\\x0a' and m.group(11) == "\\\\" and m.group(12) == "h\\x7f"


@pytest.mark.parametrize("path", MALICIOUS)
def test_a_malicious_path_stays_one_json_object(path):
    record = RECORD._replace(path=path, user_agent=b'evil"\n', peer_identity='spiffe://x/"\n')
    out = collect("json", [record, RECORD])
    lines = out.splitlines()
    assert len(lines) == 2 and out.isascii()
    doc = json.loads(lines[0])
    assert list(doc) == JSON_KEYS
    assert doc["path"] == path.decode("utf-8", "backslashreplace")
    assert doc["user_agent"] == 'evil"\n' and doc["peer_identity"] == 'spiffe://x/"\n'


def test_long_fields_are_truncated():
    record = RECORD._replace(path=b"/" + b"p" * 10_000, user_agent=b"u" * 5000, authority=b"a" * 5000)
    line = formatted("text", record).decode()
    m = TEXT_RE.match(line)
    assert len(m.group(2)) == len("GET  HTTP/1.1") + MAX_PATH
    assert len(m.group(10)) == MAX_FIELD and len(m.group(12)) == MAX_FIELD
    doc = json.loads(formatted("json", record))
    assert len(doc["path"]) == MAX_PATH and len(doc["user_agent"]) == MAX_FIELD
    assert len(escape(b"\x00" * 1000)) == 4 * MAX_FIELD


def test_lines_reach_a_real_descriptor_in_order():
    r, w = os.pipe()
    received = []
    reader = threading.Thread(target=lambda: received.append(os.fdopen(r, "rb").read()), daemon=True)
    reader.start()
    with os.fdopen(w, "w") as stream:
        log = AccessLog("text", stream, flush_interval=0.001)
        for i in range(500):
            log.log(RECORD._replace(status=200 + i % 300, bytes_sent=i))
        log.close()
        assert log.written == 500 and log.dropped == 0
    reader.join(5)
    lines = received[0].splitlines(keepends=True)
    assert [int(TEXT_RE.match(line.decode()).group(6)) for line in lines] == list(range(500))


def test_a_stdout_nobody_reads_never_blocks_the_loop_and_drops_are_counted():
    r, w = os.pipe()   # a pipe buffer of 64 KiB, and nobody reading it
    stream = os.fdopen(w, "w")
    log = AccessLog("text", stream, max_buffer_bytes=256 << 10, flush_interval=0.001)
    worst = 0.0
    for _ in range(5000):   # ~1.3 MiB of lines: the pipe takes 64 KiB, the buffer 256 KiB, the rest is dropped
        start = time.perf_counter()
        log.log(RECORD)
        worst = max(worst, time.perf_counter() - start)
    assert log.dropped > 3000, log.dropped
    assert log.pending_bytes <= 256 << 10
    assert worst < 0.05, f"a log() call took {worst * 1000:.1f} ms"
    start = time.monotonic()
    log.close(timeout=0.3)   # the writer is stuck in write(): close gives up after the timeout
    assert time.monotonic() - start < 2
    os.close(r)   # now its write fails (EPIPE): counted, the thread goes on
    deadline = time.monotonic() + 5
    while log.write_errors == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert log.write_errors > 0
    try:
        stream.close()
    except OSError:
        pass


def test_close_flushes_and_later_lines_are_dropped():
    out = io.StringIO()
    log = AccessLog("json", out, flush_interval=10)   # only close() makes it write
    for _ in range(3):
        log.log(RECORD)
    log.close()
    assert len(out.getvalue().splitlines()) == 3
    log.log(RECORD)
    assert log.dropped == 1


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError):
        AccessLog("xml", io.StringIO())


def test_the_writer_thread_is_a_daemon_and_named():
    log = AccessLog("text", io.StringIO())
    threads = [t for t in threading.enumerate() if t.name == "sidecar-access-log"]
    assert threads and all(t.daemon for t in threads)
    log.close()


