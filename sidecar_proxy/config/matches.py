"""``route_tables.T[i].match``: document -> :class:`~.model.Match`, and the host/path checks routes share."""
from __future__ import annotations

import re
from typing import Any, Callable

from ..tls.spiffe import check_pattern
from . import model
from .fields import (Errors, check_keys, describe, get, header_value_check, join, regex_check, split_host_pattern,
                     token_check)

_MATCH_KEYS = {"host", "path", "path_prefix", "path_regex", "method", "headers", "peer_identity"}
_HEADER_MATCH_KEYS = {"name", "exact", "prefix", "regex", "present", "invert"}
_PATH_RE = re.compile(r"^/[^\x00-\x20\x7f?#]*\Z")
# Standard methods: a lower-case spelling of one of them is a mistake, since
# methods are case-sensitive and the route would never match.
_STANDARD_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


def match(err: Errors, path: str, doc: dict) -> model.Match | None:
    before = len(err.items)
    check_keys(err, path, doc, _MATCH_KEYS)
    hosts = _one_or_list(err, path, doc, "host", _host_pattern)
    paths = [k for k in ("path", "path_prefix", "path_regex") if doc.get(k) is not None]
    if len(paths) > 1:
        err.add(path, f"takes at most one of path, path_prefix, path_regex (got {', '.join(paths)})")
    exact = get(err, path, doc, "path", str, default=None, check=path_check)
    prefix = get(err, path, doc, "path_prefix", str, default=None, check=path_check)
    regex = get(err, path, doc, "path_regex", str, default=None, check=regex_check)
    methods = _one_or_list(err, path, doc, "method", _method_check)
    headers = _header_matches(err, join(path, "headers"), doc.get("headers"))
    peers = _one_or_list(err, path, doc, "peer_identity", _identity_pattern)
    if len(err.items) > before:
        return None
    return model.Match(host=_unique(hosts), path=exact, path_prefix=prefix, path_regex=regex,
                       method=_unique(methods), headers=headers, peer_identity=_unique(peers))


def _identity_pattern(value: str) -> str:
    problem = check_pattern(value)
    if problem:
        raise ValueError(problem)
    return value


def _unique(values: list[str] | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values or ()))


def _one_or_list(err: Errors, path: str, doc: dict, key: str,
                 normalise: Callable[[str], str]) -> list[str] | None:
    """A string or a non-empty list of strings; ``normalise`` returns the stored form or raises ValueError."""
    value = doc.get(key)
    if value is None:
        return None
    kpath = join(path, key)
    if isinstance(value, str):
        items, paths = [value], [kpath]
    elif isinstance(value, list) and value:
        items, paths = value, [f"{kpath}[{i}]" for i in range(len(value))]
    else:
        err.add(kpath, f"must be a string or a non-empty list of strings, got {describe(value)}")
        return None
    out = []
    for item, ipath in zip(items, paths):
        if not isinstance(item, str):
            err.add(ipath, f"must be a string, got {describe(item)}")
            continue
        try:
            out.append(normalise(item))
        except ValueError as exc:
            err.add(ipath, str(exc))
    return out


def _host_pattern(text: str) -> str:
    host, port = split_host_pattern(text, wildcard=True)
    return host if port is None else f"{host}:{port}"


def authority_check(text: str) -> str | None:
    try:
        split_host_pattern(text)
    except ValueError as exc:
        return str(exc)
    return None


def normal_authority(text: str) -> str:
    host, port = split_host_pattern(text)
    return host if port is None else f"{host}:{port}"


def path_check(value: str) -> str | None:
    if _PATH_RE.match(value):
        return None
    if not value.startswith("/"):
        return f"'{value}' must start with '/'"
    if "?" in value or "#" in value:
        return f"'{value}' must not contain '?' or '#' (the query is not part of the path)"
    return f"'{value}' must not contain spaces or control characters"


def _method_check(value: str) -> str:
    problem = token_check(value)
    if problem:
        raise ValueError(problem)
    if value != value.upper() and value.upper() in _STANDARD_METHODS:
        raise ValueError(f"methods are case-sensitive: write '{value.upper()}'")
    return value


def _header_matches(err: Errors, path: str, value: Any) -> tuple[model.HeaderMatch, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        err.add(path, f"must be a list of {{name, exact|prefix|regex|present}}, got {describe(value)}")
        return ()
    out = []
    for i, doc in enumerate(value):
        hpath = f"{path}[{i}]"
        if not isinstance(doc, dict):
            err.add(hpath, f"must be a mapping with 'name' and one of exact, prefix, regex, present, "
                           f"got {describe(doc)}")
            continue
        before = len(err.items)
        check_keys(err, hpath, doc, _HEADER_MATCH_KEYS)
        name = get(err, hpath, doc, "name", str, check=token_check)
        kinds = [k for k in model.HEADER_MATCH_KINDS if doc.get(k) is not None]
        if len(kinds) != 1:
            err.add(hpath, "needs exactly one of exact, prefix, regex, present"
                           + (f" (got {', '.join(kinds)})" if kinds else ""))
        for kind in ("exact", "prefix"):
            get(err, hpath, doc, kind, str, default=None, check=header_value_check)
        get(err, hpath, doc, "regex", str, default=None, check=regex_check)
        get(err, hpath, doc, "present", bool, default=None,
            check=lambda v: None if v else "must be true (to match an absent field: present: true, invert: true)")
        invert = get(err, hpath, doc, "invert", bool, default=False)
        if len(err.items) > before:
            continue
        kind = kinds[0]
        out.append(model.HeaderMatch(name=name.lower(), kind=kind, value="" if kind == "present" else doc[kind],
                                     invert=invert))
    return tuple(out)
