"""Applying interception: backend choice, iptables-restore, policy routing, verification.

Everything that touches the kernel is here; what to install is decided by
the pure ``rules`` module from ``options`` and the tables as they are now.
Each family's rules go in with one ``iptables-restore --noflush`` call, so a
family is changed all at once or not at all. A failure exits non-zero and a
re-run is always safe: that is how an init container recovers.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..addr import format_addr
from ..transport.original_dst import original_dst
from . import rules
from .options import InterceptOptions, cidrs_for

COMMAND_TIMEOUT_S = 30.0
CAP_NET_ADMIN = 12
# Our fwmark rule's place in the policy database: before main (32766).
RULE_PRIORITY = 32000
# Documentation ranges (RFC 5737, RFC 3849): never routed anywhere, so a
# verification connection that is not redirected cannot reach a real host.
# Used only when the pod has no address of its own that the rules capture.
VERIFY_HOSTS = {4: "192.0.2.1", 6: "2001:db8::1"}
VERIFY_TIMEOUT_S = 2.0

_TOOLS = {
    ("save", 4): "iptables-{}-save", ("save", 6): "ip6tables-{}-save",
    ("restore", 4): "iptables-{}-restore", ("restore", 6): "ip6tables-{}-restore",
}


class InterceptError(Exception):
    """A failure with a message fit for the operator; the command exits 1."""


def has_net_admin(status_path: str = "/proc/self/status") -> bool:
    for line in Path(status_path).read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


def _tool(kind: str, family: int, backend: str) -> str:
    name = _TOOLS[(kind, family)].format(backend)
    path = shutil.which(name)
    if path is None:
        raise InterceptError(f"{name} not found: install iptables (it provides both the nft and legacy tools)")
    return path


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise InterceptError(f"{argv[0]} did not finish within {COMMAND_TIMEOUT_S:.0f}s") from None


def save(family: int, backend: str) -> str:
    result = _run([_tool("save", family, backend)])
    if result.returncode != 0:
        raise InterceptError(f"{Path(result.args[0]).name} failed: {result.stderr.strip() or result.returncode}")
    return result.stdout


def restore(family: int, backend: str, script: str) -> None:
    result = _run([_tool("restore", family, backend), "--noflush"], stdin=script)
    if result.returncode != 0:
        raise InterceptError(f"{Path(result.args[0]).name} --noflush rejected the IPv{family} rules "
                             f"(nothing of them was applied): {result.stderr.strip()}")


def _rule_count(family: int, backend: str) -> int:
    try:
        return sum(line.startswith("-A ") for line in save(family, backend).splitlines())
    except InterceptError:
        return -1


def detect_backend() -> str:
    """The backend the node already uses: the one whose tables hold more rules.

    kube-proxy and the CNI have written rules before any pod starts, so the
    busier backend is the node's; with no rules anywhere, nft (the default
    of current distributions).
    """
    counts = {b: sum(max(0, _rule_count(f, b)) for f in (4, 6)) for b in ("nft", "legacy")}
    if all(shutil.which(_TOOLS[("save", 4)].format(b)) is None for b in counts):
        raise InterceptError("no iptables tools found: install iptables")
    return "legacy" if counts["legacy"] > counts["nft"] else "nft"


def families(opts: InterceptOptions, backend: str) -> list[int]:
    chosen = [4] if opts.ipv4 else []
    if opts.ipv6 is True:
        chosen.append(6)
    elif opts.ipv6 == "auto" and Path("/proc/net/if_inet6").exists() and _rule_count(6, backend) >= 0:
        chosen.append(6)
    return chosen


# --- policy routing for TPROXY (netlink through pyroute2)


def _af(family: int) -> int:
    return socket.AF_INET6 if family == 6 else socket.AF_INET


def _our_rules(ipr, opts: InterceptOptions, family: int) -> list:
    return [r for r in ipr.get_rules(family=_af(family))
            if r.get_attr("FRA_FWMARK") == opts.tproxy_mark and r.get_attr("FRA_TABLE") == opts.tproxy_table]


def set_policy_routing(opts: InterceptOptions, fams: list[int], install: bool) -> list[str]:
    """Install (or remove) fwmark -> table and 'local default dev lo' in that table.

    Idempotent: an existing rule is kept, the route is replaced. Returns
    what it did, for the summary.
    """
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return _set_policy_routing(opts, fams, install)
    except NetlinkError as exc:
        # Not an OSError: without this it would surface as a traceback.
        verb = "install" if install else "remove"
        raise InterceptError(f"netlink refused to {verb} the TPROXY policy routing: "
                             f"{os.strerror(exc.code) if exc.code else exc}") from None


def _set_policy_routing(opts: InterceptOptions, fams: list[int], install: bool) -> list[str]:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    done = []
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for family in fams:
            af = _af(family)
            route = {"family": af, "dst": "::/0" if family == 6 else "0.0.0.0/0", "type": "local",
                     "oif": lo, "table": opts.tproxy_table}
            if family == 4:
                # The kernel wants scope host on an IPv4 local route: EINVAL to
                # add one without it, and ESRCH ("absent") to delete one.
                route["scope"] = "host"
            existing = _our_rules(ipr, opts, family)
            if install:
                if not existing:
                    ipr.rule("add", family=af, fwmark=opts.tproxy_mark, fwmask=0xFFFFFFFF,
                             table=opts.tproxy_table, priority=RULE_PRIORITY)
                    done.append(f"IPv{family} rule fwmark {opts.tproxy_mark:#x} lookup {opts.tproxy_table}")
                ipr.route("replace", **route)
                continue
            for rule in existing:
                ipr.rule("del", family=af, fwmark=opts.tproxy_mark, fwmask=rule.get_attr("FRA_FWMASK"),
                         table=opts.tproxy_table, priority=rule.get_attr("FRA_PRIORITY"))
                done.append(f"IPv{family} rule fwmark {opts.tproxy_mark:#x} removed")
            try:
                ipr.route("del", **route)
                done.append(f"IPv{family} local route in table {opts.tproxy_table} removed")
            except NetlinkError as exc:
                if exc.code not in (errno.ESRCH, errno.ENOENT):
                    raise
    return done


# --- verification


@dataclass
class VerifyTarget:
    host: str
    port: int


def local_addresses(family: int) -> list[str]:
    """This namespace's own addresses of a family, loopback and link-local left out."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=_af(family))]
    return [a for a in found if a and not (ipaddress.ip_address(a).is_loopback
                                           or ipaddress.ip_address(a).is_link_local)]


def verify_target(opts: InterceptOptions, family: int, own: list[str]) -> VerifyTarget:
    """An address the rules capture, preferring the pod's own (``own``).

    Connecting to the pod's own address is routed even in a pod with no
    default route, and if the rules do not catch it the connection stays in
    the pod. Next come addresses inside the include CIDRs, then a
    documentation address, which no network routes anywhere.
    """
    includes = cidrs_for(family, opts.outbound_include_cidrs)
    include_nets = [ipaddress.ip_network(c) for c in includes if c != "*"]
    exclude_nets = [ipaddress.ip_network(c) for c in cidrs_for(family, opts.outbound_exclude_cidrs) if c != "*"]

    def captured(host: str) -> bool:
        ip = ipaddress.ip_address(host)
        return ("*" in includes or any(ip in net for net in include_nets)) and not any(ip in net for net in exclude_nets)

    candidates = [*own, *(str(next(iter(net.hosts()), net.network_address)) for net in include_nets),
                  VERIFY_HOSTS[family]]
    host = next((h for h in candidates if captured(h)), None)
    if host is None:
        raise InterceptError(f"--verify: no IPv{family} address is captured by the include/exclude CIDRs")
    port = next(p for p in range(9, 65536) if p not in opts.outbound_exclude_ports)
    return VerifyTarget(host, port)


def _probe_socket(family: int, port: int) -> socket.socket:
    probe = socket.socket(_af(family), socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == 6:
        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        probe.bind(("::" if family == 6 else "0.0.0.0", port))
    except OSError as exc:
        probe.close()
        raise InterceptError(f"--verify: cannot listen on the outbound port {port} ({exc.strerror}); "
                             "verification runs before the proxy starts") from None
    probe.listen(8)
    probe.settimeout(VERIFY_TIMEOUT_S)
    return probe


def _connect_as(uid: int, gid: int, family: int, target: VerifyTarget) -> None:
    """Connect from a child process running as the proxy's user and group."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(_af(family), socket.SOCK_STREAM) as s:
                s.settimeout(VERIFY_TIMEOUT_S / 2)
                s.connect_ex((target.host, target.port))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def verify_family(opts: InterceptOptions, family: int) -> str:
    if os.getuid() == opts.proxy_uid or os.getgid() == opts.proxy_gid:
        raise InterceptError(f"--verify: this process runs as the proxy's exempt uid {opts.proxy_uid} or gid "
                             f"{opts.proxy_gid}, so its own test connection cannot be redirected; "
                             "run init as another user (root)")
    target = verify_target(opts, family, local_addresses(family))
    where = format_addr((target.host, target.port))
    with _probe_socket(family, opts.outbound_port) as probe:
        try:
            client = socket.create_connection((target.host, target.port), timeout=VERIFY_TIMEOUT_S)
        except OSError as exc:
            raise InterceptError(f"--verify: a connection to {where} was not redirected to port "
                                 f"{opts.outbound_port} ({exc.strerror or exc})") from None
        with client:
            try:
                accepted, _ = probe.accept()
            except socket.timeout:
                raise InterceptError(f"--verify: a connection to {where} did not reach port "
                                     f"{opts.outbound_port}") from None
            with accepted:
                seen = original_dst(accepted)
        if seen is None or (ipaddress.ip_address(seen[0]), seen[1]) != (ipaddress.ip_address(target.host),
                                                                          target.port):
            raise InterceptError(f"--verify: redirected, but the original destination read back is "
                                 f"{format_addr(seen)} instead of {where}")
        _connect_as(opts.proxy_uid, opts.proxy_gid, family, target)
        probe.settimeout(0.2)
        try:
            leaked, _ = probe.accept()
        except (socket.timeout, BlockingIOError):
            pass
        else:
            leaked.close()
            raise InterceptError(f"--verify: traffic of the proxy's own uid {opts.proxy_uid} / gid "
                                 f"{opts.proxy_gid} was redirected too: the proxy would loop")
    return (f"IPv{family}: {where} is redirected to :{opts.outbound_port}; "
            f"uid {opts.proxy_uid}/gid {opts.proxy_gid} is not")


# --- the commands


def dry_run(opts: InterceptOptions, backend: str, fams: list[int]) -> str:
    out = []
    for family in fams:
        try:
            state, note = rules.parse_save(save(family, backend)), "against the current tables"
        except InterceptError as exc:
            state, note = rules.parse_save(""), f"against empty tables (cannot read them: {exc})"
        out.append(f"# IPv{family}: {_TOOLS[('restore', family)].format(backend)} --noflush, {note}")
        out.append(rules.render(opts, family, state).rstrip("\n"))
    for line in rules.policy_routing(opts, fams):
        out.append(f"# {line}")
    return "\n".join(out) + "\n"


def install(opts: InterceptOptions, backend: str, fams: list[int]) -> list[str]:
    done = []
    for family in fams:
        state = rules.parse_save(save(family, backend))
        restore(family, backend, rules.render(opts, family, state))
        done.append(f"IPv{family} rules installed ({backend})")
    # Also in redirect mode: a previous tproxy run's routing must not linger.
    done += set_policy_routing(opts, fams, install=opts.inbound_mode == "tproxy")
    return done


def cleanup(opts: InterceptOptions, backend: str, fams: list[int]) -> list[str]:
    done = []
    for family in fams:
        script = rules.render_cleanup(family, rules.parse_save(save(family, backend)))
        if script.strip():
            restore(family, backend, script)
            done.append(f"IPv{family} rules removed ({backend})")
    done += set_policy_routing(opts, fams, install=False)
    return done
