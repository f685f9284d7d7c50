"""SPIFFE ID syntax and the identity patterns of allow lists.

Pure string functions, no certificates: the config validator and the
handshake share them, so an ID that passes here is exactly one the peer check
accepts.

SPIFFE ID (SPIFFE standard, "SPIFFE-ID", sections 2 and 2.1-2.3):
``spiffe://<trust domain><path>`` where

- the scheme is ``spiffe`` (lower case) and ``//`` follows;
- the trust domain is 1..255 characters of ``a-z 0-9 . - _`` (lower case
  only: no normalisation happens anywhere, so ``Example.org`` is not
  ``example.org`` and is refused); this also rules out userinfo (``@``) and a
  port (``:``);
- the path is empty, or ``/``-separated segments of ``a-z A-Z 0-9 . - _``,
  none of them empty, ``.`` or ``..`` (so no trailing ``/``) and no
  percent-encoding;
- no query (``?``) and no fragment (``#``); at most 2048 bytes in all.

Patterns (``allow_identities`` of a route, ``peer_identity`` of a cluster):

- ``*`` alone matches every SPIFFE ID;
- a pattern ending in ``*`` matches every ID that starts with the text before
  the ``*`` (the rest may be empty): ``spiffe://td/ns/prod/*`` matches IDs
  below ``/ns/prod/``, ``spiffe://td/sa/web-*`` matches ``.../sa/web-1`` and
  ``.../sa/web-``. The text before the ``*`` must contain the whole trust
  domain and the ``/`` after it: ``spiffe://example.org*`` would also match
  ``spiffe://example.org.evil.net/...``, so it is refused rather than
  matched;
- anything else is an exact, case-sensitive SPIFFE ID; ``*`` anywhere but
  at the end is refused.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

__all__ = ["SpiffeId", "parse_spiffe_id", "check_pattern", "IdentityMatcher", "identity_matches"]

_PREFIX = "spiffe://"
_MAX_ID_BYTES = 2048
_MAX_TRUST_DOMAIN = 255
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[a-zA-Z0-9._-]+")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    path: str  # "" or "/seg/seg"

    def __str__(self) -> str:
        return f"{_PREFIX}{self.trust_domain}{self.path}"


def parse_spiffe_id(text: str) -> SpiffeId:
    """Parse and validate a SPIFFE ID. Raises ValueError saying which rule it breaks."""
    if not isinstance(text, str):
        raise ValueError(f"a SPIFFE ID is a string, got {type(text).__name__}")
    if len(text.encode("utf-8", "surrogatepass")) > _MAX_ID_BYTES:
        raise ValueError(f"longer than {_MAX_ID_BYTES} bytes")
    if not text.startswith(_PREFIX):
        scheme = text.split(":", 1)[0] if ":" in text else ""
        if scheme.lower() == "spiffe":
            raise ValueError("a SPIFFE ID starts with 'spiffe://', in lower case")
        raise ValueError(f"not a spiffe:// URI: {text[:64]!r}")
    rest = text[len(_PREFIX):]
    for char, what in (("?", "a query"), ("#", "a fragment")):
        if char in rest:
            raise ValueError(f"a SPIFFE ID has no {what} ('{char}')")
    domain, slash, path = rest.partition("/")
    if not domain:
        raise ValueError("the trust domain is empty")
    if "@" in domain:
        raise ValueError("a SPIFFE ID has no userinfo ('@') in its trust domain")
    if ":" in domain:
        raise ValueError("a SPIFFE ID has no port in its trust domain")
    if len(domain) > _MAX_TRUST_DOMAIN:
        raise ValueError(f"the trust domain is longer than {_MAX_TRUST_DOMAIN} characters")
    if not _TRUST_DOMAIN.fullmatch(domain):
        if domain.lower() != domain and _TRUST_DOMAIN.fullmatch(domain.lower()):
            raise ValueError(f"the trust domain must be lower case, got {domain!r}")
        raise ValueError(f"the trust domain {domain!r} may only contain a-z, 0-9, '.', '-' and '_'")
    if not slash:
        return SpiffeId(domain, "")
    for segment in path.split("/"):
        if segment == "":
            raise ValueError("the path has an empty segment (a '//' or a trailing '/')")
        if segment in (".", ".."):
            raise ValueError(f"the path has a '{segment}' segment")
        if not _SEGMENT.fullmatch(segment):
            if "%" in segment:
                raise ValueError("the path must not be percent-encoded")
            raise ValueError(f"the path segment {segment!r} may only contain letters, digits, '.', '-' and '_'")
    return SpiffeId(domain, "/" + path)


def check_pattern(pattern: str) -> str | None:
    """None if ``pattern`` is a valid identity pattern, else why not (for config errors)."""
    if pattern == "*":
        return None
    if not isinstance(pattern, str) or not pattern:
        return "must be a SPIFFE ID, a SPIFFE ID prefix ending in '*', or '*'"
    head, star = (pattern[:-1], True) if pattern.endswith("*") else (pattern, False)
    if "*" in head:
        return "'*' may only be the last character"
    if not star:
        try:
            parse_spiffe_id(pattern)
        except ValueError as exc:
            return f"not a valid SPIFFE ID: {exc}"
        return None
    domain_end = head.find("/", len(_PREFIX))
    if not head.startswith(_PREFIX) or domain_end < 0:
        return ("a '*' must follow the whole trust domain and a '/', "
                "e.g. 'spiffe://example.org/*' or 'spiffe://example.org/ns/prod/*'")
    # The prefix must itself be the start of some valid ID: validate it with a
    # stand-in last segment (a prefix may end inside a segment, or after '/').
    probe = head + "x" if head.endswith("/") else head
    try:
        parse_spiffe_id(probe)
    except ValueError as exc:
        return f"the part before '*' is not the start of a valid SPIFFE ID: {exc}"
    return None


class IdentityMatcher:
    """Patterns compiled once (per config snapshot); ``matches`` is a set lookup and a few prefix tests."""

    __slots__ = ("any", "exact", "prefixes", "patterns")

    def __init__(self, patterns: Iterable[str]) -> None:
        patterns = tuple(patterns)
        for p in patterns:
            problem = check_pattern(p)
            if problem is not None:
                raise ValueError(f"identity pattern {p!r}: {problem}")
        self.patterns = patterns
        self.any = "*" in patterns
        self.exact = frozenset(p for p in patterns if not p.endswith("*"))
        self.prefixes = tuple(p[:-1] for p in patterns if p.endswith("*") and p != "*")

    def matches(self, spiffe_id: str) -> bool:
        if self.any or spiffe_id in self.exact:
            return True
        return spiffe_id.startswith(self.prefixes) if self.prefixes else False

    def __repr__(self) -> str:
        return f"IdentityMatcher({list(self.patterns)!r})"


def identity_matches(spiffe_id: str, patterns: Iterable[str] | IdentityMatcher) -> bool:
    """Whether ``spiffe_id`` is allowed by any of ``patterns`` (see the module docstring).

    For a hot path, build an :class:`IdentityMatcher` once and pass it.
    """
    matcher = patterns if isinstance(patterns, IdentityMatcher) else IdentityMatcher(patterns)
    return matcher.matches(spiffe_id)
