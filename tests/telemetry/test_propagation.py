"""Trace context on the wire, parsed and written without the SDK: W3C traceparent/tracestate and B3."""
import re

import pytest

from sidecar_proxy.telemetry import propagation as p

TID = b"0af7651916cd43dd8448eb211c80319c"
SID = b"b7ad6b7169203331"
TP = b"00-" + TID + b"-" + SID + b"-01"


@pytest.mark.parametrize("value,expected", [
    (TP, (TID, SID, True)),
    (TP[:-2] + b"00", (TID, SID, False)),
    (TP[:-2] + b"03", (TID, SID, True)),            # level 2: the random flag beside sampled
    (TP[:-2] + b"02", (TID, SID, False)),
    (b"01" + TP[2:] + b"-what-comes-later", (TID, SID, True)),   # a later version may append fields
    (b"cc" + TP[2:], (TID, SID, True)),
])
def test_valid_traceparents(value, expected):
    assert p.parse_traceparent(value) == expected


@pytest.mark.parametrize("value", [
    b"", b"00", TP[:-1], TP + b"0", TP + b"-x",                     # version 00 is exactly 55 bytes
    b"ff" + TP[2:],                                                 # version ff is invalid
    TP.upper(), b"00-" + TID.upper() + b"-" + SID + b"-01",         # upper-case hex
    b"00-" + b"0" * 32 + b"-" + SID + b"-01",                       # all-zero trace id
    b"00-" + TID + b"-" + b"0" * 16 + b"-01",                       # all-zero parent id
    b"00_" + TP[3:], b"00-" + TID + b"_" + SID + b"-01", b"00-" + TID[:-1] + b"g-" + SID + b"-01",
    b"0x-" + TP[3:], b"00-" + TID + b"-" + SID + b"-0g", b"01" + TP[2:] + b"x",
])
def test_invalid_traceparents(value):
    assert p.parse_traceparent(value) is None


def extract(headers, propagators=(p.TRACECONTEXT,)):
    return p.extract(headers, propagators, p.names_for(propagators))


def test_extract_tracecontext_with_tracestate_joined():
    ctx, seen = extract([(b"host", b"h"), (b"tracestate", b"a=1"), (b"traceparent", TP), (b"tracestate", b"b=2")])
    assert seen and ctx == (TID, SID, True, b"a=1,b=2")
    assert isinstance(ctx, tuple)


def test_tracestate_without_traceparent_is_no_context_but_seen():
    assert extract([(b"tracestate", b"a=1")]) == (None, True)
    assert extract([(b"host", b"h")]) == (None, False)


def test_two_traceparent_fields_are_invalid():
    assert extract([(b"traceparent", TP), (b"traceparent", TP)]) == (None, True)


def test_fields_of_unconfigured_formats_are_ignored():
    assert extract([(b"b3", TID + b"-" + SID + b"-1")]) == (None, False)
    assert extract([(b"traceparent", TP)], (p.B3,)) == (None, False)


@pytest.mark.parametrize("value,expected", [
    (TID + b"-" + SID + b"-1", (TID, SID, True, None)),
    (TID + b"-" + SID + b"-0", (TID, SID, False, None)),
    (TID + b"-" + SID + b"-d", (TID, SID, True, None)),               # debug: sampled
    (TID + b"-" + SID, (TID, SID, None, None)),                       # deferred
    (TID + b"-" + SID + b"-1-" + SID, (TID, SID, True, None)),        # with the parent id
    (TID[16:] + b"-" + SID + b"-1", (b"0" * 16 + TID[16:], SID, True, None)),   # 64-bit trace id, padded
    (b"0", (b"", b"", False, None)),                                  # a decision without ids
    (b"1", (b"", b"", True, None)),
])
def test_b3_single(value, expected):
    assert p.parse_b3_single(value) == expected


@pytest.mark.parametrize("value", [b"", b"x", b"2", TID + b"-" + SID + b"-2", TID.upper() + b"-" + SID + b"-1",
                                   TID[:-1] + b"-" + SID, TID + b"-" + SID[:-1], b"0" * 32 + b"-" + SID,
                                   TID + b"-" + SID + b"-1-" + SID + b"-x", TID + b"-" + SID + b"-1-zz"])
def test_b3_single_invalid(value):
    assert p.parse_b3_single(value) is None


@pytest.mark.parametrize("fields,expected", [
    ({b"x-b3-traceid": TID, b"x-b3-spanid": SID, b"x-b3-sampled": b"1"}, (TID, SID, True, None)),
    ({b"x-b3-traceid": TID, b"x-b3-spanid": SID, b"x-b3-sampled": b"true"}, (TID, SID, True, None)),
    ({b"x-b3-traceid": TID, b"x-b3-spanid": SID, b"x-b3-sampled": b"0"}, (TID, SID, False, None)),
    ({b"x-b3-traceid": TID, b"x-b3-spanid": SID, b"x-b3-flags": b"1"}, (TID, SID, True, None)),
    ({b"x-b3-traceid": TID, b"x-b3-spanid": SID}, (TID, SID, None, None)),
    ({b"x-b3-sampled": b"0"}, (b"", b"", False, None)),
    ({b"x-b3-traceid": TID}, None),
    ({b"x-b3-traceid": b"nothex", b"x-b3-spanid": SID}, None),
])
def test_b3_multi(fields, expected):
    ctx, seen = extract(list(fields.items()), (p.B3MULTI,))
    assert seen and ctx == expected


def test_single_b3_wins_over_multi_and_the_last_format_wins():
    other = b"1" * 32
    headers = [(b"b3", other + b"-" + SID + b"-1"), (b"x-b3-traceid", TID), (b"x-b3-spanid", SID),
               (b"traceparent", TP)]
    assert extract(headers, (p.B3,))[0][0] == other
    assert extract(headers, (p.B3, p.TRACECONTEXT))[0][0] == TID
    assert extract(headers, (p.TRACECONTEXT, p.B3))[0][0] == other
    # An invalid later format does not erase a valid earlier one.
    assert extract([(b"traceparent", TP), (b"b3", b"junk")], (p.TRACECONTEXT, p.B3))[0][0] == TID


def test_names_for_each_format():
    assert p.names_for(()) == frozenset()
    assert p.names_for((p.TRACECONTEXT,)) == {b"traceparent", b"tracestate"}
    assert p.names_for((p.B3,)) == p.names_for((p.B3MULTI,)) == {
        b"b3", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid", b"x-b3-sampled", b"x-b3-flags"}


LINE = re.compile(rb"([a-z0-9-]+): ([!-~]+)\r\n")


def test_injected_lines_are_well_formed_field_lines():
    tid, sid = int(TID, 16), int(SID, 16)
    inj = p.Injector((p.TRACECONTEXT, p.B3, p.B3MULTI))
    lines = inj.lines(tid, sid, True, b"a=1,b=2", 3)
    fields = LINE.findall(lines)
    assert b"".join(b"%s: %s\r\n" % f for f in fields) == lines
    assert fields == [(b"traceparent", b"00-" + TID + b"-" + SID + b"-03"), (b"tracestate", b"a=1,b=2"),
                      (b"b3", TID + b"-" + SID + b"-1"), (b"x-b3-traceid", TID), (b"x-b3-spanid", SID),
                      (b"x-b3-sampled", b"1")]
    assert p.Injector((p.TRACECONTEXT,)).lines(tid, sid, False) == b"traceparent: 00-" + TID + b"-" + SID + b"-00\r\n"
    assert p.Injector(()).lines(tid, sid, True) == b""
    # What is injected parses back to the same context.
    assert p.parse_traceparent(fields[0][1]) == (TID, SID, True)
    assert p.parse_b3_single(fields[2][1]) == (TID, SID, True, None)
