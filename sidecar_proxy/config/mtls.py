"""mTLS settings: the workload certificate (top-level ``tls``), ``listeners.X.tls``, ``clusters.X.tls`` and
``route_tables.T[i].authorization``.

Identity patterns are checked with :func:`..tls.spiffe.check_pattern`, the
function the handshake's peer check is built on, so a pattern that validates
here is one the data path accepts.
"""
from __future__ import annotations

import ipaddress
from typing import Any

from ..tls.spiffe import check_pattern
from . import model
from .fields import Errors, check_keys, describe, get, get_parsed, join, parse_duration, split_host_pattern

_IDENTITY_KEYS = {"cert_chain", "private_key", "trust_bundle", "poll_interval", "handshake_timeout"}
NEEDS_IDENTITY = "needs the top-level tls section (the workload certificate)"


def identity(err: Errors, doc: Any) -> model.TlsIdentity | None:
    """None when absent: then no listener or cluster may ask for mTLS (their ``tls.mode`` says so)."""
    if doc is None:
        return None
    if not isinstance(doc, dict):
        err.add("tls", f"must be a mapping with cert_chain, private_key, trust_bundle, got {describe(doc)}")
        return None
    before = len(err.items)
    check_keys(err, "tls", doc, _IDENTITY_KEYS)
    # Absolute like control.cache: a relative path would depend on the directory the proxy was started in.
    paths = {key: get(err, "tls", doc, key, str,
                      check=lambda v: None if v.startswith("/") else "must be an absolute path")
             for key in ("cert_chain", "private_key", "trust_bundle")}
    d = model.TlsIdentity("", "", "")
    poll = get_parsed(err, "tls", doc, "poll_interval", parse_duration, d.poll_interval,
                      lambda v: None if 0.1 <= v <= 60 else "must be at least 100ms and at most 60s")
    handshake = get_parsed(err, "tls", doc, "handshake_timeout", parse_duration, d.handshake_timeout,
                           lambda v: None if 0 < v <= 60 else "must be greater than 0 and at most 60s")
    if len(err.items) > before:
        return None
    return model.TlsIdentity(**paths, poll_interval=poll, handshake_timeout=handshake)


def listener_tls(err: Errors, path: str, doc: Any, has_identity: bool) -> model.ListenerTls | None:
    if doc is None:
        return model.ListenerTls()
    if not isinstance(doc, dict):
        err.add(path, f"must be a mapping with 'mode', got {describe(doc)}")
        return None
    check_keys(err, path, doc, {"mode"})
    mode = get(err, path, doc, "mode", str, default="disable",
               check=lambda v: _mode_check(v, model.TLS_LISTENER_MODES))
    if mode is None:
        return None
    if mode != "disable" and not has_identity:
        err.add(join(path, "mode"), NEEDS_IDENTITY)
        return None
    return model.ListenerTls(mode=mode)


def cluster_tls(err: Errors, path: str, doc: Any, has_identity: bool) -> model.ClusterTls | None:
    if doc is None:
        return model.ClusterTls()
    if not isinstance(doc, dict):
        err.add(path, f"must be a mapping with 'mode', got {describe(doc)}")
        return None
    before = len(err.items)
    check_keys(err, path, doc, {"mode", "peer_identity", "sni"})
    mode = get(err, path, doc, "mode", str, default="disable",
               check=lambda v: _mode_check(v, model.TLS_CLUSTER_MODES))
    peers = patterns(err, join(path, "peer_identity"), doc.get("peer_identity"), single=True)
    sni = get(err, path, doc, "sni", str, default=None, check=_sni_check)
    if mode == "mutual":
        if not has_identity:
            err.add(join(path, "mode"), NEEDS_IDENTITY)
        if doc.get("peer_identity") is None:
            err.add(join(path, "peer_identity"), "is required with mode: mutual (the SPIFFE IDs the server may "
                                                 "present; the trust bundle alone would accept any workload)")
    elif mode is not None:
        for key in ("peer_identity", "sni"):
            if doc.get(key) is not None:
                err.add(join(path, key), "applies only with mode: mutual")
    if len(err.items) > before:
        return None
    return model.ClusterTls(mode=mode, peer_identity=peers or (), sni=sni.lower() if sni else None)


def route_authorization(err: Errors, path: str, doc: Any) -> model.Authorization | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        err.add(path, f"must be a mapping with 'allow_identities', got {describe(doc)}")
        return None
    before = len(err.items)
    check_keys(err, path, doc, {"allow_identities"})
    if doc.get("allow_identities") is None:
        err.add(join(path, "allow_identities"), "is required")
    allowed = patterns(err, join(path, "allow_identities"), doc.get("allow_identities"))
    if len(err.items) > before:
        return None
    return model.Authorization(allow_identities=allowed)


def patterns(err: Errors, path: str, value: Any, single: bool = False) -> tuple[str, ...] | None:
    """A non-empty list of identity patterns (with ``single``, a string is a list of one); repeats dropped."""
    if value is None:
        return None
    if single and isinstance(value, str):
        problem = check_pattern(value)
        if problem:
            err.add(path, problem)
            return None
        return (value,)
    if not isinstance(value, list) or not value:
        what = ("a SPIFFE ID or pattern, or a non-empty list of them" if single else
                "a non-empty list of SPIFFE IDs or patterns")
        err.add(path, f"must be {what}, got {'an empty list' if value == [] else describe(value)}")
        return None
    out = []
    for i, item in enumerate(value):
        problem = check_pattern(item) if isinstance(item, str) else f"must be a string, got {describe(item)}"
        if problem:
            err.add(f"{path}[{i}]", problem)
        else:
            out.append(item)
    return tuple(dict.fromkeys(out)) if len(out) == len(value) else None


def _mode_check(value: str, modes: tuple[str, ...]) -> str | None:
    return None if value in modes else f"'{value}' is not a mode (one of: {', '.join(modes)})"


def _sni_check(value: str) -> str | None:
    """A DNS name: TLS sends no port in server_name, and no IP address either (RFC 6066, section 3)."""
    try:
        host, port = split_host_pattern(value)
    except ValueError as exc:
        return str(exc)
    if port is not None:
        return "must not have a port"
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return f"'{value}' is an IP address; server_name carries DNS names only"
