"""The validator's toolkit: collect errors by path, read typed fields, parse durations and sizes.

Every reader adds an error naming the document path and returns None
instead of raising, so one pass over a document reports everything wrong
with it. ``load.py`` describes the sections with these.
"""
from __future__ import annotations

import difflib
import ipaddress
import re
from typing import Any, Callable

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h)\s*$")
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
               "KB": 10**3, "MB": 10**6, "GB": 10**9}
# RFC 9110 token: field names and methods. (\Z, not $: $ also matches before a final "\n".)
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# Field values: visible ASCII, obs-text (>= 0x80), space and tab; nothing
# that could end a line (CR, LF) or a C string (NUL), no other controls.
_BAD_VALUE_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Underscores too: Docker Compose service names carry them into Host fields.
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_DNS_RE = re.compile(rf"^(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*\Z")


class ConfigError(Exception):
    """All validation errors of one document, each with its path."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("\n".join(f"{p}: {m}" if p else m for p, m in errors))


class Errors:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.items.append((path, message))


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def describe(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "empty"}.get(type(value), type(value).__name__)


# --- leaf parsers: each returns the parsed value or None after adding an error


def parse_duration(value: Any) -> float:
    """'250ms' / '1.5s' / '2m' / '1h' / '100us' -> seconds. Raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"must be a duration string with a unit such as '250ms' or '1s', got {describe(value)}")
    m = _DURATION_RE.match(value)
    if not m:
        raise ValueError(f"'{value}' is not a duration: use a number and one of us, ms, s, m, h (e.g. '250ms')")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(value: Any) -> int:
    """1048576 / '64KiB' / '1MiB' -> bytes. Raises ValueError."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError(f"'{value}' is not a size: use bytes or a number with B, KiB, MiB, GiB")


def check_keys(err: Errors, path: str, doc: dict, allowed: set[str], planned: set[str] | frozenset = frozenset()) -> None:
    """Unknown keys are errors, with a did-you-mean; ``planned`` ones say "not supported by this build yet"."""
    for key in doc:
        if key in allowed:
            continue
        kpath = join(path, str(key))
        if key in planned:
            err.add(kpath, "is part of the schema but not supported by this build yet")
            continue
        hint = difflib.get_close_matches(str(key), sorted(allowed), n=1)
        err.add(kpath, "unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else
                                          f"; allowed: {', '.join(sorted(allowed))}"))


def get(err: Errors, path: str, doc: dict, key: str, kind: type | tuple, default: Any = ...,
         check: Callable[[Any], str | None] | None = None) -> Any:
    """Fetch ``doc[key]`` of ``kind``; add an error and return None if wrong."""
    kpath = join(path, key)
    if key not in doc or doc[key] is None:
        if default is ...:
            err.add(kpath, "is required")
            return None
        return default
    value = doc[key]
    # bool is an int subclass; a port of `true` is a mistake, not 1.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        names = " or ".join(describe(k()) if k is not type(None) else "empty" for k in _as_tuple(kind))
        err.add(kpath, f"must be {names}, got {describe(value)}")
        return None
    if check is not None:
        problem = check(value)
        if problem:
            err.add(kpath, problem)
            return None
    return value


def _as_tuple(kind: type | tuple) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def get_parsed(err: Errors, path: str, doc: dict, key: str, parser: Callable[[Any], Any],
                default: Any, check: Callable[[Any], str | None] | None = None) -> Any:
    kpath = join(path, key)
    if key not in doc or doc[key] is None:
        return default
    try:
        value = parser(doc[key])
    except ValueError as exc:
        err.add(kpath, str(exc))
        return None
    problem = check(value) if check else None
    if problem:
        err.add(kpath, problem)
        return None
    return value


def port_check(value: int) -> str | None:
    return None if 1 <= value <= 65535 else f"port must be 1..65535, got {value}"


def ip_check(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"'{value}' is not an IP address (listeners bind IP literals, e.g. 0.0.0.0 or ::)"
    return None


def name_check(kind: str, name: Any) -> str | None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        return (f"{kind} name '{name}' must be 1-63 characters of letters, digits, '_', '.', '-' "
                "starting with a letter or digit")
    return None


def positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than zero"


def mapping_section(err: Errors, doc: dict, key: str) -> dict:
    value = doc.get(key)
    if value is None:
        err.add(key, "is required")
        return {}
    if not isinstance(value, dict):
        err.add(key, f"must be a mapping of name to {key[:-1]}, got {describe(value)}")
        return {}
    return value


def token_check(value: str) -> str | None:
    return None if _TOKEN_RE.match(value) else f"'{value}' is not an HTTP token (letters, digits, !#$%&'*+-.^_`|~)"


def header_value_check(value: str) -> str | None:
    bad = _BAD_VALUE_RE.search(value)
    if bad:
        return (f"must not contain control characters such as CR, LF or NUL "
                f"(found {bad.group()!r} at {bad.start()})")
    return None


def split_host_pattern(text: str, wildcard: bool = False) -> tuple[str, int | None]:
    """'Host', 'host:80', '[::1]:80', '10.0.0.1' -> (lower-case host, port or None). Raises ValueError.

    The host is a DNS name, an IPv4 literal, or an IPv6 literal in brackets;
    with ``wildcard`` also ``*.`` followed by a DNS name.
    """
    text = text.lower()
    if text.startswith("["):
        host, sep, rest = text.partition("]")
        host += sep
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"'{text}' is not host[:port] (IPv6 is written [addr] or [addr]:port)")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"'{host[1:-1]}' is not an IPv6 address") from None
        port_text = rest[1:] if rest else None
    else:
        if text.count(":") > 1:
            raise ValueError(f"'{text}': write IPv6 addresses as [addr] or [addr]:port")
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = None
        name = host[2:] if wildcard and host.startswith("*.") else host
        if not _DNS_RE.match(name):
            raise ValueError(f"'{host}' is not a host name or IP address"
                             + (" (wildcards are written *.suffix)" if wildcard and "*" in host else ""))
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 1..65535, got '{port_text}'")
    return host, int(port_text)


def regex_check(value: str) -> str | None:
    """Patterns run on bytes (request paths and field values), so they are checked as bytes patterns."""
    if len(value) > MAX_REGEX_LENGTH:
        return f"is longer than {MAX_REGEX_LENGTH} characters"
    try:
        re.compile(value.encode())
    except re.error as exc:
        return f"invalid regex: {exc}"
    return None


MAX_REGEX_LENGTH = 1024


# --- sections
