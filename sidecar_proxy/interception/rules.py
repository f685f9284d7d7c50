"""iptables rules that send the pod's TCP through the proxy, as ``iptables-restore --noflush`` scripts.

Pure: text in (``iptables-save`` output, options), text out. Running the
scripts is ``apply.py``'s job.

Packet paths (one address family; ip6tables gets the same rules):

* App outbound: nat OUTPUT -> SIDECAR_OUTPUT. The proxy's own uid/gid, loopback
  destinations, excluded ports and excluded CIDRs RETURN (go direct); what
  is left and matches an include CIDR jumps to SIDECAR_REDIRECT, which
  REDIRECTs it to the outbound port. The proxy reads the real destination
  with SO_ORIGINAL_DST and connects there as its own uid, which the first
  rule exempts, so it never loops back into itself.
* Inbound, redirect mode: nat PREROUTING -> SIDECAR_INBOUND. Always-excluded
  (admin, metrics) and excluded ports RETURN; included ports go to
  SIDECAR_IN_REDIRECT, which REDIRECTs to the inbound port. The proxy then
  connects to the app from its own uid; nat sees only a connection's first
  packet, so that connection's trip through lo is not redirected again.
* Inbound, tproxy mode: mangle PREROUTING -> SIDECAR_INBOUND. mangle sees every
  packet, so: lo traffic RETURNs (it was made in the pod and has already been
  through the outbound rules), excluded ports RETURN, packets of connections
  the proxy already holds (``-m socket --transparent``) are marked and
  accepted by SIDECAR_DIVERT, and the first packet of a new connection is
  marked and handed to the inbound port by SIDECAR_TPROXY, keeping the
  client's source address. The mark only takes effect with the policy route
  of :func:`policy_routing`: marked packets are looked up in a table whose
  only route says "every address is local", so they are delivered to this
  host instead of being routed on.

Every script is idempotent: it declares our chains (under --noflush that
creates or empties them), deletes every hook into them that the current
``iptables-save`` shows, however many copies, and appends the hooks once.
Chains and hooks of ours that the current options do not use (left by a run
in the other mode) are removed. iptables-restore commits each table in one
transaction, so a re-run never leaves the pod half-intercepted.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping, Sequence

from .options import ANY, InterceptOptions, cidrs_for

CHAIN_PREFIX = "SIDECAR_"

OUTPUT = "SIDECAR_OUTPUT"
REDIRECT = "SIDECAR_REDIRECT"
INBOUND = "SIDECAR_INBOUND"
IN_REDIRECT = "SIDECAR_IN_REDIRECT"
DIVERT = "SIDECAR_DIVERT"
TPROXY = "SIDECAR_TPROXY"

# xt_multiport takes at most 15 ports per rule.
MULTIPORT_MAX = 15
FAMILIES = (4, 6)
_LOOPBACK = {4: "127.0.0.0/8", 6: "::1/128"}
_ANY_ADDRESS = {4: "0.0.0.0", 6: "::"}
_ALL_ADDRESSES = {4: "0.0.0.0/0", 6: "::/0"}
_TARGET_FLAGS = ("-j", "-g")
# `iptables-save -c` puts "[packets:bytes] " before each rule.
_COUNTERS = re.compile(r"^\[\d+:\d+\]\s+")


class SaveParseError(ValueError):
    """``iptables-save`` output that could not be read; the message names the line."""


@dataclass(frozen=True)
class TableState:
    """What one table of ``iptables-save`` holds that matters to us."""

    chains: frozenset[str] = frozenset()  # our chains (SIDECAR_*)
    hooks: tuple[str, ...] = ()  # rules outside our chains that jump into them, as after "-A "
    rules: tuple[str, ...] = ()  # every rule of the table, as after "-A "


_NO_TABLE = TableState()


@dataclass(frozen=True)
class SaveState:
    """One family's ``iptables-save`` output, by table name."""

    tables: Mapping[str, TableState] = field(default_factory=lambda: MappingProxyType({}))

    def table(self, name: str) -> TableState:
        return self.tables.get(name, _NO_TABLE)


def is_ours(chain: str) -> bool:
    return chain.startswith(CHAIN_PREFIX)


# --- reading iptables-save -----------------------------------------------------------------


def parse_save(text: str) -> SaveState:
    """Read ``iptables-save`` / ``ip6tables-save`` output (with or without ``-c``)."""
    chains: dict[str, set[str]] = {}
    rules: dict[str, list[str]] = {}
    table: str | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = _COUNTERS.sub("", raw.strip())
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table = line[1:]
            chains.setdefault(table, set())
            rules.setdefault(table, [])
        elif table is None:
            raise SaveParseError(f"line {number}: {line!r} is outside a table")
        elif line == "COMMIT":
            table = None
        elif line.startswith(":"):
            chain = line[1:].split(maxsplit=1)[0]
            if is_ours(chain):
                chains[table].add(chain)
        elif line.startswith("-A "):
            rules[table].append(line[3:])
        else:
            raise SaveParseError(f"line {number}: unexpected {line!r}")
    return SaveState(MappingProxyType({
        name: TableState(frozenset(chains[name]), tuple(r for r in rules[name] if _is_hook(r)),
                         tuple(rules[name]))
        for name in rules
    }))


def _is_hook(rule: str) -> bool:
    """Whether ``rule`` (text after "-A ") sits outside our chains and jumps into one."""
    try:
        words = shlex.split(rule)  # a quoted --comment may contain anything
    except ValueError as exc:
        raise SaveParseError(f"rule {rule!r}: {exc}") from None
    if is_ours(words[0]):
        return False
    return any(flag in _TARGET_FLAGS and is_ours(target) for flag, target in zip(words, words[1:]))


# --- what we install -------------------------------------------------------------------------


@dataclass(frozen=True)
class _TablePlan:
    name: str
    chains: tuple[str, ...]
    rules: tuple[str, ...]  # as after "-A ", hooks into our chains last


def _plan(opts: InterceptOptions, family: int) -> list[_TablePlan]:
    if opts.inbound_mode == "tproxy":
        return [_nat(opts, family, inbound=False), _mangle(opts, family)]
    return [_nat(opts, family, inbound=True)]


def _nat(opts: InterceptOptions, family: int, inbound: bool) -> _TablePlan:
    chains = [OUTPUT, REDIRECT]
    rules = [f"{REDIRECT} -p tcp -j REDIRECT --to-ports {opts.outbound_port}", *_outbound(opts, family)]
    hooks = [f"OUTPUT -p tcp -j {OUTPUT}"]
    if inbound:
        chains += [INBOUND, IN_REDIRECT]
        rules += [f"{IN_REDIRECT} -p tcp -j REDIRECT --to-ports {opts.inbound_port}",
                  *_inbound_exclusions(opts),
                  *_inbound_capture(opts, IN_REDIRECT)]
        hooks.append(f"PREROUTING -p tcp -j {INBOUND}")
    return _TablePlan("nat", tuple(chains), tuple(rules + hooks))


def _outbound(opts: InterceptOptions, family: int) -> list[str]:
    # Exemptions come first: the proxy's own connections must never be
    # redirected, whatever the include list says.
    rules = [f"{OUTPUT} -m owner --uid-owner {opts.proxy_uid} -j RETURN",
             f"{OUTPUT} -m owner --gid-owner {opts.proxy_gid} -j RETURN",
             f"{OUTPUT} -d {_LOOPBACK[family]} -j RETURN",
             *_multiport(OUTPUT, opts.outbound_exclude_ports, "RETURN"),
             *(f"{OUTPUT} -d {cidr} -j RETURN" for cidr in cidrs_for(family, opts.outbound_exclude_cidrs))]
    if opts.outbound_include_cidrs == (ANY,):
        rules.append(f"{OUTPUT} -j {REDIRECT}")
    else:
        rules += [f"{OUTPUT} -d {cidr} -j {REDIRECT}" for cidr in cidrs_for(family, opts.outbound_include_cidrs)]
    return rules


def _mangle(opts: InterceptOptions, family: int) -> _TablePlan:
    mark = f"{opts.tproxy_mark:#x}/0xffffffff"
    rules = [f"{DIVERT} -j MARK --set-xmark {mark}",
             f"{DIVERT} -j ACCEPT",
             f"{TPROXY} ! -d {_LOOPBACK[family]} -p tcp -j TPROXY --on-port {opts.inbound_port}"
             f" --on-ip {_ANY_ADDRESS[family]} --tproxy-mark {mark}",
             # mangle sees every packet, also those of connections made inside
             # the pod (the proxy's own to the app among them): leave lo alone.
             f"{INBOUND} -i lo -j RETURN",
             *_inbound_exclusions(opts),
             f"{INBOUND} -p tcp -m socket --transparent -j {DIVERT}",
             *_inbound_capture(opts, TPROXY),
             f"PREROUTING -p tcp -j {INBOUND}"]
    return _TablePlan("mangle", (INBOUND, DIVERT, TPROXY), tuple(rules))


def _inbound_exclusions(opts: InterceptOptions) -> list[str]:
    ports = tuple(dict.fromkeys(opts.inbound_always_exclude_ports + opts.inbound_exclude_ports))
    return _multiport(INBOUND, ports, "RETURN")


def _inbound_capture(opts: InterceptOptions, target: str) -> list[str]:
    if opts.inbound_include_ports == (ANY,):
        return [f"{INBOUND} -p tcp -j {target}"]
    return _multiport(INBOUND, opts.inbound_include_ports, target)


def _multiport(chain: str, ports: Sequence[int | str], target: str) -> list[str]:
    return [f"{chain} -p tcp -m multiport --dports {','.join(map(str, ports[i:i + MULTIPORT_MAX]))} -j {target}"
            for i in range(0, len(ports), MULTIPORT_MAX)]


# --- scripts -------------------------------------------------------------------------------


def render(opts: InterceptOptions, family: int, state: SaveState) -> str:
    """The ``iptables-restore --noflush`` script that makes ``state`` hold exactly our rules once."""
    _check_family(family)
    return _script(_plan(opts, family), state)


def render_cleanup(family: int, state: SaveState) -> str:
    """The script that removes every chain and hook of ours in ``state``; "" if there are none."""
    _check_family(family)
    return _script([], state)


def _check_family(family: int) -> None:
    if family not in FAMILIES:
        raise ValueError(f"address family must be 4 or 6, not {family!r}")


def _script(plans: Iterable[_TablePlan], state: SaveState) -> str:
    planned = {plan.name: plan for plan in plans}
    leftover = sorted(name for name, table in state.tables.items()
                      if name not in planned and (table.chains or table.hooks))
    lines: list[str] = []
    for name in [*planned, *leftover]:
        lines += _table_section(planned.get(name, _TablePlan(name, (), ())), state.table(name))
    return "".join(f"{line}\n" for line in lines)


def _table_section(plan: _TablePlan, current: TableState) -> list[str]:
    stale = sorted(current.chains - set(plan.chains))
    if not plan.chains and not stale and not current.hooks:
        return []
    # Declaring a chain under --noflush creates it or empties it; only an
    # empty chain that nothing jumps to can be deleted with -X, hence the order.
    return [f"*{plan.name}",
            *(f":{chain} - [0:0]" for chain in (*plan.chains, *stale)),
            *(f"-D {hook}" for hook in current.hooks),
            *(f"-X {chain}" for chain in stale),
            *(f"-A {rule}" for rule in plan.rules),
            "COMMIT"]


# --- tproxy policy routing -------------------------------------------------------------------


def policy_routing(opts: InterceptOptions, families: Sequence[int] | None = None) -> list[str]:
    """What tproxy mode needs from ``ip rule`` / ``ip route``, one line per entry, for --dry-run.

    ``families`` defaults to those the options may use (``ipv6="auto"``
    counts); apply time passes the ones it resolved.
    """
    if opts.inbound_mode != "tproxy":
        return []
    if families is None:
        families = [family for family, wanted in ((4, opts.ipv4), (6, opts.ipv6 is not False)) if wanted]
    lines = []
    for family in families:
        _check_family(family)
        lines += [f"ip -{family} rule: fwmark {opts.tproxy_mark:#x} lookup {opts.tproxy_table}",
                  f"ip -{family} route: local {_ALL_ADDRESSES[family]} dev lo table {opts.tproxy_table}"]
    return lines
