"""The options of ``sidecar-proxy init-iptables``: flags -> validated :class:`InterceptOptions`.

Every flag is read by argparse as a plain string and validated here, so a bad
value is reported as ``--flag: 'value' is ...`` by :class:`OptionError` rather
than by argparse's usage error. Lists are comma-separated; ``*`` (alone)
means "all" where a flag allows it, and an empty string is an empty list.
"""
from __future__ import annotations

import argparse
import ipaddress
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

ANY = "*"
INBOUND_MODES = ("redirect", "tproxy")
BACKENDS = ("auto", "nft", "legacy")
_IPV6_CHOICES: dict[str, bool | Literal["auto"]] = {"auto": "auto", "on": True, "off": False}

MAX_ID = 2**32 - 2  # (uid_t)-1 means "no id" to the kernel
MAX_MARK = 2**32 - 1
MAX_TABLE = 2**31
RESERVED_TABLES = {253: "default", 254: "main", 255: "local"}

_DECIMAL = re.compile(r"[0-9]+")
_HEX = re.compile(r"0[xX][0-9a-fA-F]+")


@dataclass(frozen=True)
class InterceptOptions:
    """What ``init-iptables`` installs. CIDRs are stored normalised (``10.0.0.0/8``)."""

    proxy_uid: int = 1337
    proxy_gid: int = 1337
    outbound_port: int = 15001
    inbound_port: int = 15006
    outbound_include_cidrs: tuple[str, ...] = (ANY,)
    outbound_exclude_cidrs: tuple[str, ...] = ()
    outbound_exclude_ports: tuple[int, ...] = ()
    inbound_include_ports: tuple[int | str, ...] = (ANY,)
    inbound_exclude_ports: tuple[int, ...] = ()
    inbound_always_exclude_ports: tuple[int, ...] = (15000, 15090)
    inbound_mode: Literal["redirect", "tproxy"] = "redirect"
    tproxy_mark: int = 1337
    tproxy_table: int = 133
    ipv4: bool = True
    ipv6: bool | Literal["auto"] = "auto"
    backend: Literal["auto", "nft", "legacy"] = "auto"


class OptionError(Exception):
    """One invalid flag value; ``str()`` is ``--flag: message``."""

    def __init__(self, option: str, message: str):
        self.option = option
        self.message = message
        super().__init__(f"{option}: {message}")


# --- value parsers: text -> value, or ValueError with a message naming the text ------------


def _integer(text: str, low: int, high: int, what: str, hex_ok: bool = False) -> int:
    # Patterns, not bare int(): int() also takes "1_000", "+5" and " 5 ".
    value = None
    if _DECIMAL.fullmatch(text):
        value = int(text)
    elif hex_ok and _HEX.fullmatch(text):
        value = int(text, 16)
    if value is None or not low <= value <= high:
        raise ValueError(f"{text!r} is not {what} ({low}..{high})")
    return value


def _port(text: str) -> int:
    return _integer(text, 1, 65535, "a port")


def _id(text: str) -> int:
    return _integer(text, 0, MAX_ID, "a uid/gid")


def _mark(text: str) -> int:
    return _integer(text, 1, MAX_MARK, "a mark", hex_ok=True)


def _table(text: str) -> int:
    table = _integer(text, 1, MAX_TABLE, "a routing table")
    if table in RESERVED_TABLES:
        raise ValueError(f"table {table} is reserved (the kernel's {RESERVED_TABLES[table]!r} table)")
    return table


def _cidr(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise ValueError(f"{text!r} is not a CIDR") from None


def _choice(choices: Iterable[str]) -> Callable[[str], str]:
    allowed = tuple(choices)

    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"{text!r} is not one of {', '.join(allowed)}")
        return text
    return parse


def _ipv6(text: str) -> bool | Literal["auto"]:
    _choice(_IPV6_CHOICES)(text)
    return _IPV6_CHOICES[text]


def _list(item: Callable[[str], object], allow_any: bool) -> Callable[[str], tuple]:
    """A parser of comma-separated ``item``s; duplicates are dropped, order is kept."""

    def parse(text: str) -> tuple:
        if not text.strip():
            return ()
        entries = [entry.strip() for entry in text.split(",")]
        if "" in entries:
            raise ValueError(f"empty entry in {text!r}")
        if ANY in entries:
            if not allow_any:
                raise ValueError(f"{ANY!r} is not allowed here")
            if len(entries) > 1:
                raise ValueError(f"{ANY!r} cannot be combined with other entries in {text!r}")
            return (ANY,)
        return tuple(dict.fromkeys(item(entry) for entry in entries))
    return parse


# --- flags ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Flag:
    name: str
    field: str
    parse: Callable[[str], object]
    metavar: str
    help: str


_FLAGS = (
    _Flag("--proxy-uid", "proxy_uid", _id, "UID",
          "uid the proxy runs as; its connections are never redirected"),
    _Flag("--proxy-gid", "proxy_gid", _id, "GID",
          "gid the proxy runs as; its connections are never redirected"),
    _Flag("--outbound-port", "outbound_port", _port, "PORT",
          "the proxy's transparent outbound listener"),
    _Flag("--inbound-port", "inbound_port", _port, "PORT",
          "the proxy's transparent inbound listener"),
    _Flag("--outbound-include-cidrs", "outbound_include_cidrs", _list(_cidr, allow_any=True), "CIDRS",
          "destinations whose outgoing TCP is redirected to the proxy; '*' for all"),
    _Flag("--outbound-exclude-cidrs", "outbound_exclude_cidrs", _list(_cidr, allow_any=False), "CIDRS",
          "destinations reached directly, never through the proxy"),
    _Flag("--outbound-exclude-ports", "outbound_exclude_ports", _list(_port, allow_any=False), "PORTS",
          "destination ports reached directly, never through the proxy"),
    _Flag("--inbound-include-ports", "inbound_include_ports", _list(_port, allow_any=True), "PORTS",
          "local ports whose incoming TCP is sent to the proxy; '*' for all"),
    _Flag("--inbound-exclude-ports", "inbound_exclude_ports", _list(_port, allow_any=False), "PORTS",
          "local ports whose incoming TCP goes straight to the app"),
    _Flag("--inbound-always-exclude-ports", "inbound_always_exclude_ports", _list(_port, allow_any=False),
          "PORTS", "the proxy's own ports (admin, metrics), never captured"),
    _Flag("--inbound-mode", "inbound_mode", _choice(INBOUND_MODES), "|".join(INBOUND_MODES),
          "inbound capture: nat REDIRECT, or mangle TPROXY (keeps the client's source address)"),
    _Flag("--tproxy-mark", "tproxy_mark", _mark, "MARK",
          "tproxy mode: fwmark of diverted packets, decimal or 0x hex"),
    _Flag("--tproxy-table", "tproxy_table", _table, "TABLE",
          "tproxy mode: routing table that delivers marked packets locally"),
    _Flag("--ipv6", "ipv6", _ipv6, "|".join(_IPV6_CHOICES),
          "install ip6tables rules; auto: decided when the rules are applied"),
    _Flag("--iptables-backend", "backend", _choice(BACKENDS), "|".join(BACKENDS),
          "iptables flavour; auto: detected when the rules are applied"),
)


def _shown(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the interception flags to ``parser``; read the result with :func:`from_namespace`."""
    defaults = InterceptOptions()
    for flag in _FLAGS:
        # default None: "not given", so from_namespace keeps the dataclass default.
        parser.add_argument(flag.name, dest=flag.field, metavar=flag.metavar, default=None,
                            help=f"{flag.help} (default: {_shown(getattr(defaults, flag.field))})")
    parser.add_argument("--no-ipv4", dest="ipv4", action="store_false",
                        help="install no iptables (IPv4) rules, only ip6tables ones (default: IPv4 on)")


def from_namespace(ns: argparse.Namespace) -> InterceptOptions:
    """Validated options from parsed flags; raises :class:`OptionError` on the first bad value."""
    given = vars(ns)
    values: dict[str, object] = {}
    for flag in _FLAGS:
        text = given.get(flag.field)
        if text is None:
            continue
        try:
            values[flag.field] = flag.parse(text)
        except ValueError as exc:
            raise OptionError(flag.name, str(exc)) from None
    opts = InterceptOptions(**values, ipv4=given.get("ipv4", True))
    _check_combination(opts)
    return opts


def _check_combination(opts: InterceptOptions) -> None:
    if opts.outbound_port == opts.inbound_port:
        raise OptionError("--inbound-port", f"{opts.inbound_port} is also the outbound port; they must differ")
    if not opts.ipv4 and opts.ipv6 is False:
        raise OptionError("--no-ipv4", "with --ipv6 off there is nothing to intercept")


def cidrs_for(family: int, cidrs: Iterable[str]) -> list[str]:
    """The entries of ``cidrs`` of one address family (4 or 6); ``*`` belongs to both."""
    return [cidr for cidr in cidrs if cidr == ANY or ipaddress.ip_network(cidr).version == family]

