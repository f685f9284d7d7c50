"""``sidecar-proxy init-iptables``, end to end: its rules intercept real traffic.

Each test gets a fresh pod/remote namespace pair (``netns.py``) and runs the
real command inside the pod namespace, as the pod's init container would::

    ip netns exec POD python3 -m sidecar_proxy init-iptables [options]

then, where traffic is involved, the real proxy (group 1337, the identity the
rules exempt) with the pod's usual listeners: ``outbound``/``outbound6`` on
15001 and ``inbound``/``inbound6`` on 15006, all relaying to the connection's
original destination.

* Outbound: an app socket in the pod dials the remote; the proxy must be in
  between (it lists the connection with the right original destination) and
  the remote sees the proxy's connection, not the app's.
* Inbound, in ``redirect`` (nat REDIRECT) and ``tproxy`` (mangle TPROXY plus
  policy routing) modes: a client in the remote namespace dials the pod's
  address; the proxy takes it and connects to the app's server in the pod.
* Bypasses: excluded outbound ports and CIDRs, excluded inbound ports,
  loopback, and the proxy's uid (checked with a non-Python process, since
  Python can't run as uid 1337 on this machine) go direct: the far end sees
  the very socket that dialled, and the proxy counts nothing.
* The tables themselves: re-running is a no-op, switching modes leaves
  nothing of the other mode, ``--cleanup`` restores exactly what was there
  (rules of others included), bad options and a missing CAP_NET_ADMIN change
  nothing, ``--dry-run`` prints and changes nothing. Tables are compared as
  ``iptables-save``/``ip6tables-save`` output without comments and counters,
  together with ``ip rule`` and the tproxy routing table.

Every pod gets a default route via the remote end (as a real pod has one):
``--verify`` dials a documentation address, which needs a route to exist
before netfilter ever sees the packet. Nothing is forwarded by the remote, so
no packet leaves the two namespaces.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import subprocess
import sys
from typing import Sequence

import pytest

from ..support import REPO_ROOT, require_tools, round_trip_upper
from . import netns
from .netns import POD_V4, POD_V6, REMOTE_V4, REMOTE_V6, connect_from, run_in

pytestmark = pytest.mark.e2e

PROXY_UID = 1337
PROXY_GID = 1337
OTHER_ID = 4242  # neither the proxy's uid nor its gid
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
ADMIN_PORT = 15000
TPROXY_MARK = "0x539"  # 1337, the default --tproxy-mark
TPROXY_TABLE = "133"  # the default --tproxy-table
APP_PORT = 8080  # intercepted
EXCLUDED_OUT_PORT = 9090
EXCLUDED_IN_PORT = 9091

INIT_TIMEOUT_S = 60.0
OPENED = "sidecar_tcp_connections_opened_total"
LISTENERS = ("outbound", "outbound6", "inbound", "inbound6")
MODES = ("redirect", "tproxy")

# Rules and policy routes of "someone else" (a CNI, the node): init-iptables
# must work beside them and --cleanup must leave them exactly as they were.
FOREIGN_RULES = {
    "iptables": [
        ["-t", "nat", "-N", "CNI_KEEP"],
        ["-t", "nat", "-A", "CNI_KEEP", "-j", "RETURN"],
        ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "203.0.113.7/32", "-j", "CNI_KEEP"],
        ["-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "7777", "-j", "RETURN"],
        ["-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "--dport", "7777", "-j", "RETURN"],
        ["-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "7778", "-j", "ACCEPT"],
    ],
    "ip6tables": [
        ["-t", "nat", "-N", "CNI_KEEP"],
        ["-t", "nat", "-A", "CNI_KEEP", "-j", "RETURN"],
        ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "2001:db8:7::7/128", "-j", "CNI_KEEP"],
        ["-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "7777", "-j", "RETURN"],
        ["-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "--dport", "7777", "-j", "RETURN"],
        ["-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "7778", "-j", "ACCEPT"],
    ],
}
FOREIGN_IP_RULES = [
    ["ip", "-4", "rule", "add", "fwmark", "0x99", "lookup", "99", "priority", "1000"],
    ["ip", "-6", "rule", "add", "fwmark", "0x99", "lookup", "99", "priority", "1000"],
]

REQUIRED_TOOLS = ("iptables", "ip6tables", "iptables-save", "ip6tables-save", "setpriv", "bash")


# --- the pod ---------------------------------------------------------------------------------


def pod_config(inbound_mode: str = "redirect") -> dict:
    """The sidecar's config in a dual-stack pod (as config/pod-dual-stack.yaml)."""
    inbound_extra = {"interception": "tproxy"} if inbound_mode == "tproxy" else {}

    def listener(address: str, port: int, **extra) -> dict:
        return {"address": address, "port": port, "transparent": True, "protocol": "tcp",
                "routes": "passthrough", **extra}

    return {
        "version": 1,
        "node": {"id": "pod-under-test"},
        "admin": {"address": "127.0.0.1", "port": ADMIN_PORT},
        "listeners": {
            "outbound": listener("0.0.0.0", OUTBOUND_PORT),
            "outbound6": listener("::", OUTBOUND_PORT),
            "inbound": listener("0.0.0.0", INBOUND_PORT, **inbound_extra),
            "inbound6": listener("::", INBOUND_PORT, **inbound_extra),
        },
        "clusters": {"original-destination": {"original_destination": True, "connect_timeout": "2s"}},
        "route_tables": {"passthrough": [{"match": {}, "cluster": "original-destination"}]},
    }


def prepare_pod(pair: netns.NetnsPair) -> None:
    """Give the pod a default route (via the remote end, which forwards nothing)."""
    run_in(pair.pod, ["ip", "-4", "route", "add", "default", "via", REMOTE_V4])
    run_in(pair.pod, ["ip", "-6", "route", "add", "default", "via", REMOTE_V6])


def add_foreign_rules(namespace: str) -> None:
    for tool, commands in FOREIGN_RULES.items():
        for args in commands:
            run_in(namespace, [tool, "-w", *args])
    for argv in FOREIGN_IP_RULES:
        run_in(namespace, argv)


@pytest.fixture
def pod(netns_pair) -> netns.NetnsPair:
    """A fresh pod/remote pair, the pod with a default route."""
    require_tools(*REQUIRED_TOOLS)
    prepare_pod(netns_pair)
    return netns_pair


@pytest.fixture
def busy_pod(pod) -> netns.NetnsPair:
    """A pod whose tables already hold other rules (a CNI's, say)."""
    add_foreign_rules(pod.pod)
    return pod


# --- running init-iptables -------------------------------------------------------------------


def init_iptables(namespace: str, *args: str, prefix: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """``[prefix] python3 -m sidecar_proxy init-iptables ARGS`` inside ``namespace``."""
    argv = netns.exec_argv(namespace, [*prefix, sys.executable, "-m", "sidecar_proxy", "init-iptables", *args])
    try:
        return subprocess.run(argv, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=INIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(argv)}: no exit within {INIT_TIMEOUT_S}s")


def describe(done: subprocess.CompletedProcess) -> str:
    return (f"`{' '.join(done.args)}` exited {done.returncode}\n"
            f"--- stdout\n{done.stdout}--- stderr\n{done.stderr}")


def init_ok(namespace: str, *args: str) -> subprocess.CompletedProcess:
    done = init_iptables(namespace, *args)
    assert done.returncode == 0, describe(done)
    assert "Traceback" not in done.stdout + done.stderr, describe(done)
    return done


def assert_verified(done: subprocess.CompletedProcess, families: Sequence[int] = (4, 6)) -> None:
    """--verify reported a proven redirection for every family."""
    for family in families:
        pattern = re.compile(rf"IPv{family}\b.*(redirect|verif)", re.IGNORECASE)
        assert any(pattern.search(line) for line in done.stdout.splitlines()), (
            f"no verification reported for IPv{family}:\n{describe(done)}")


# --- the tables as they stand ----------------------------------------------------------------

_COUNTERS = re.compile(r"\[\d+:\d+\]")


def normalise_save(text: str) -> str:
    """``iptables-save`` output without its comment lines and packet:byte counters."""
    return "\n".join(_COUNTERS.sub("[0:0]", line) for line in text.splitlines()
                     if line.strip() and not line.startswith("#"))


def _route_table(namespace: str, family: str, table: str) -> str:
    done = subprocess.run(netns.exec_argv(namespace, ["ip", family, "route", "show", "table", table]),
                          capture_output=True, text=True, timeout=netns.COMMAND_TIMEOUT_S)
    if done.returncode != 0:
        # A table with no route at all does not exist: same as empty.
        assert "does not exist" in done.stderr, done.stderr
        return ""
    return done.stdout.strip()


def tables_state(namespace: str) -> dict[str, str]:
    """What init-iptables may change in ``namespace``, normalised for comparison."""
    state = {tool: normalise_save(run_in(namespace, [tool])) for tool in ("iptables-save", "ip6tables-save")}
    for family in ("-4", "-6"):
        state[f"ip {family} rule"] = run_in(namespace, ["ip", family, "rule", "show"]).strip()
        state[f"ip {family} route show table {TPROXY_TABLE}"] = _route_table(namespace, family, TPROXY_TABLE)
    return state


def assert_same_state(expected: dict[str, str], actual: dict[str, str], what: str) -> None:
    diffs = []
    for key in expected:
        if expected[key] != actual[key]:
            diffs.append(f"### {key}\n" + "\n".join(difflib.unified_diff(
                expected[key].splitlines(), actual[key].splitlines(), "expected", "actual", lineterm="")))
    assert not diffs, f"{what}:\n" + "\n".join(diffs)


def fwmark_rules(state: dict[str, str]) -> list[str]:
    return [line for key in ("ip -4 rule", "ip -6 rule") for line in state[key].splitlines()
            if f"fwmark {TPROXY_MARK}" in line]


def assert_mode_installed(state: dict[str, str], mode: str) -> None:
    """The tables hold ``mode``'s rules and nothing of the other mode's."""
    for tool in ("iptables-save", "ip6tables-save"):
        save = state[tool]
        tables = _tables(save)
        assert "-j SIDECAR_OUTPUT" in tables.get("nat", ""), f"{tool}: no outbound hook\n{save}"
        nat_inbound = "-A PREROUTING -p tcp -j SIDECAR_INBOUND" in tables.get("nat", "")
        mangle = tables.get("mangle", "")
        if mode == "redirect":
            assert nat_inbound, f"{tool}: redirect mode without the nat inbound hook\n{save}"
            assert "SIDECAR" not in mangle and "TPROXY" not in save, f"{tool}: tproxy leftovers\n{save}"
        else:
            assert not nat_inbound and ":SIDECAR_INBOUND" not in tables.get("nat", ""), (
                f"{tool}: redirect-mode inbound leftovers in nat\n{save}")
            assert "-j SIDECAR_INBOUND" in mangle and "TPROXY --on-port 15006" in mangle, (
                f"{tool}: tproxy mode without its mangle rules\n{save}")
    routes = [state[f"ip {family} route show table {TPROXY_TABLE}"] for family in ("-4", "-6")]
    if mode == "redirect":
        assert fwmark_rules(state) == [], f"tproxy ip rules left in redirect mode: {fwmark_rules(state)}"
        assert routes == ["", ""], f"table {TPROXY_TABLE} not empty in redirect mode: {routes}"
    else:
        assert len(fwmark_rules(state)) == 2, f"expected one fwmark rule per family: {state}"
        assert all(f"lookup {TPROXY_TABLE}" in line for line in fwmark_rules(state))
        assert all(route.startswith("local default dev lo") for route in routes), routes


def _tables(save: str) -> dict[str, str]:
    """``iptables-save`` output split by table."""
    tables: dict[str, str] = {}
    name = None
    for line in save.splitlines():
        if line.startswith("*"):
            name = line[1:]
            tables[name] = ""
        elif name is not None:
            tables[name] += line + "\n"
    return tables


# --- traffic ---------------------------------------------------------------------------------


def endpoint(host: str, port: int) -> str:
    """An address the way the admin API writes it: ``h:p``, ``[h6]:p``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def any_address(host: str) -> str:
    return "::" if ":" in host else "0.0.0.0"


def opened(proxy) -> dict[str, float]:
    metrics = proxy.metrics()
    return {name: metrics.get((OPENED, (("listener", name),)), 0.0) for name in LISTENERS}


def through_proxy(proxy, server, namespace: str, host: str, port: int, listener: str) -> dict:
    """Dial host:port from ``namespace``; the proxy must be in between. Returns its /connections entry."""
    peers_before = len(server.wait_for_peers(0, timeout=0))
    with contextlib.closing(connect_from(namespace, host, port)) as sock:
        round_trip_upper(sock, b"through the sidecar")
        local = sock.getsockname()[:2]
        connections = proxy.connections()
        entries = [c for c in connections if c["original_destination"] == endpoint(host, port)]
        assert len(entries) == 1, (f"{endpoint(*local)} -> {endpoint(host, port)}: expected one proxied "
                                   f"connection, /connections has {connections}")
        entry = entries[0]
        assert entry["listener"] == listener, entry
        assert entry["downstream"] == endpoint(*local), entry
        assert entry["upstream"] == endpoint(host, port), entry
        assert entry["cluster"] == "original-destination", entry
    peers = server.wait_for_peers(peers_before + 1)
    assert len(peers) == peers_before + 1, f"server saw {peers}"
    assert peers[-1] != local, "the server saw the dialling socket itself: the proxy was not in between"
    return entry


def direct(proxy, server, namespace: str, host: str, port: int) -> None:
    """Dial host:port from ``namespace``; it must go straight there, the proxy seeing nothing."""
    before = opened(proxy)
    peers_before = len(server.wait_for_peers(0, timeout=0))
    with contextlib.closing(connect_from(namespace, host, port)) as sock:
        round_trip_upper(sock, b"straight there")
        local = sock.getsockname()[:2]
        connections = proxy.connections()
        assert connections == [], f"{endpoint(*local)} -> {endpoint(host, port)} went through the proxy: " \
                                  f"{connections}"
    peers = server.wait_for_peers(peers_before + 1)
    assert peers[peers_before:] == [local], (
        f"{endpoint(host, port)}: server saw {peers[peers_before:]}, not the dialling socket {local}")
    assert opened(proxy) == before, "the proxy accepted a connection meant to bypass it"


# --- 1. outbound -----------------------------------------------------------------------------

FAMILIES = [
    pytest.param(REMOTE_V4, POD_V4, "outbound", id="ipv4"),
    pytest.param(REMOTE_V6, POD_V6, "outbound6", id="ipv6"),
]


@pytest.mark.parametrize("remote, pod_address, listener", FAMILIES)
def test_outbound_goes_through_the_proxy(pod, start_proxy, start_upper_server, remote, pod_address, listener):
    done = init_ok(pod.pod, "--verify")
    assert_verified(done)
    proxy = start_proxy(pod_config(), gid=PROXY_GID)
    server = start_upper_server(pod.remote, remote, APP_PORT)

    entry = through_proxy(proxy, server, pod.pod, remote, APP_PORT, listener)

    assert entry["state"] == "established"
    # The remote's peer is the proxy's own connection from the pod's address.
    assert server.wait_for_peers(1)[0][0] == pod_address
    assert opened(proxy)[listener] == 1


# --- 2. inbound ------------------------------------------------------------------------------

INBOUND_FAMILIES = [
    pytest.param(POD_V4, "inbound", id="ipv4"),
    pytest.param(POD_V6, "inbound6", id="ipv6"),
]


@pytest.mark.parametrize("pod_address, listener", INBOUND_FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_inbound_goes_through_the_proxy(pod, start_proxy, start_upper_server, mode, pod_address, listener):
    done = init_ok(pod.pod, "--inbound-mode", mode, "--verify")
    assert_verified(done)
    proxy = start_proxy(pod_config(mode), gid=PROXY_GID)
    # The app serves both families on :8080.
    servers = {host: start_upper_server(pod.pod, any_address(host), APP_PORT) for host in (POD_V4, POD_V6)}

    entry = through_proxy(proxy, servers[pod_address], pod.remote, pod_address, APP_PORT, listener)

    # Both modes keep the client's address as the downstream (checked in
    # through_proxy); the proxy dials the app at the address the client asked for.
    assert entry["state"] == "established"
    assert opened(proxy)[listener] == 1
    assert sum(opened(proxy).values()) == 1, f"the proxy's hop to the app was intercepted again: {opened(proxy)}"


# --- 3. excluded ports and CIDRs -------------------------------------------------------------


def test_excluded_ports_and_loopback_bypass_the_proxy(pod, start_proxy, start_upper_server):
    init_ok(pod.pod, "--outbound-exclude-ports", str(EXCLUDED_OUT_PORT),
            "--inbound-exclude-ports", str(EXCLUDED_IN_PORT), "--verify")
    proxy = start_proxy(pod_config(), gid=PROXY_GID)

    for remote, pod_address, suffix in ((REMOTE_V4, POD_V4, ""), (REMOTE_V6, POD_V6, "6")):
        # Outbound: the excluded port goes direct, the intercepted one does not.
        excluded = start_upper_server(pod.remote, remote, EXCLUDED_OUT_PORT)
        direct(proxy, excluded, pod.pod, remote, EXCLUDED_OUT_PORT)
        remote_app = start_upper_server(pod.remote, remote, APP_PORT)
        through_proxy(proxy, remote_app, pod.pod, remote, APP_PORT, "outbound" + suffix)

        # Inbound: the same, for connections to the pod.
        excluded_app = start_upper_server(pod.pod, any_address(pod_address), EXCLUDED_IN_PORT)
        direct(proxy, excluded_app, pod.remote, pod_address, EXCLUDED_IN_PORT)
        app = start_upper_server(pod.pod, any_address(pod_address), APP_PORT)
        through_proxy(proxy, app, pod.remote, pod_address, APP_PORT, "inbound" + suffix)

    # Loopback is never captured, on any port.
    for loopback in ("127.0.0.1", "::1"):
        local = start_upper_server(pod.pod, loopback, EXCLUDED_IN_PORT + 1)
        direct(proxy, local, pod.pod, loopback, EXCLUDED_IN_PORT + 1)


def test_excluded_cidr_bypasses_the_proxy(pod, start_proxy, start_upper_server):
    init_ok(pod.pod, "--outbound-exclude-cidrs", f"{REMOTE_V4}/32", "--verify")
    proxy = start_proxy(pod_config(), gid=PROXY_GID)

    direct(proxy, start_upper_server(pod.remote, REMOTE_V4, APP_PORT), pod.pod, REMOTE_V4, APP_PORT)
    # The exclusion is for IPv4 only: the same remote over IPv6 is still intercepted.
    through_proxy(proxy, start_upper_server(pod.remote, REMOTE_V6, APP_PORT), pod.pod, REMOTE_V6, APP_PORT,
                  "outbound6")


# --- 4. the proxy's uid ----------------------------------------------------------------------


def _bash_exchange(namespace: str, uid: int, gid: int, host: str, port: int) -> str:
    """Send "hi" to host:port from bash running as uid/gid (no Python: it can't run as 1337 here)."""
    script = f"exec 3<>/dev/tcp/{host}/{port}; echo hi >&3; head -c 2 <&3"
    return run_in(namespace, ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                              "bash", "-c", script])


def test_proxy_uid_is_exempt_without_its_gid(pod, start_proxy, start_upper_server):
    init_ok(pod.pod)
    proxy = start_proxy(pod_config(), gid=PROXY_GID)
    cases = [  # uid, gid, whether the proxy must see it
        (PROXY_UID, OTHER_ID, False),
        (OTHER_ID, PROXY_GID, False),
        (OTHER_ID, OTHER_ID, True),  # the control: anyone else is intercepted
    ]
    for remote, pod_address, listener in ((REMOTE_V4, POD_V4, "outbound"), (REMOTE_V6, POD_V6, "outbound6")):
        server = start_upper_server(pod.remote, remote, APP_PORT)
        for count, (uid, gid, proxied) in enumerate(cases, 1):
            before = opened(proxy)[listener]
            answer = _bash_exchange(pod.pod, uid, gid, remote, APP_PORT)
            assert answer == "HI", f"uid {uid}/gid {gid} -> {endpoint(remote, APP_PORT)}: got {answer!r}"
            peers = server.wait_for_peers(count)
            assert len(peers) == count and peers[-1][0] == pod_address, peers
            if proxied:
                after = proxy.wait_for_metric(OPENED, before + 1, listener=listener)
                assert after == before + 1, f"uid {uid}/gid {gid} was not intercepted"
            else:
                after = opened(proxy)[listener]
                assert after == before, (f"uid {uid}/gid {gid} was redirected into the proxy "
                                         f"({OPENED}{{listener={listener!r}}} {before} -> {after})")


# --- 5. re-runs and mode switches ------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_init_twice_is_a_no_op(busy_pod, mode):
    init_ok(busy_pod.pod, "--inbound-mode", mode)
    first = tables_state(busy_pod.pod)
    assert_mode_installed(first, mode)
    init_ok(busy_pod.pod, "--inbound-mode", mode)
    assert_same_state(first, tables_state(busy_pod.pod), f"{mode}: the second run changed the tables")


def test_switching_modes_leaves_nothing_of_the_other(busy_pod):
    namespace = busy_pod.pod
    init_ok(namespace, "--inbound-mode", "tproxy")
    tproxy = tables_state(namespace)  # tproxy, installed on a pod without ours
    assert_mode_installed(tproxy, "tproxy")

    init_ok(namespace, "--inbound-mode", "redirect")
    redirect = tables_state(namespace)
    assert_mode_installed(redirect, "redirect")

    init_ok(namespace, "--inbound-mode", "tproxy")
    assert_same_state(tproxy, tables_state(namespace), "tproxy after redirect differs from a fresh tproxy")
    init_ok(namespace, "--inbound-mode", "redirect")
    assert_same_state(redirect, tables_state(namespace), "redirect after tproxy, second switch")

    # And redirect after tproxy equals redirect on a pod that never had tproxy.
    fresh = netns.create_pair()
    try:
        prepare_pod(fresh)
        add_foreign_rules(fresh.pod)
        init_ok(fresh.pod, "--inbound-mode", "redirect")
        assert_same_state(tables_state(fresh.pod), redirect,
                          "redirect after tproxy differs from redirect on a fresh pod")
    finally:
        fresh.destroy()


# --- 6. cleanup ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_cleanup_restores_the_tables(busy_pod, mode):
    namespace = busy_pod.pod
    before = tables_state(namespace)
    init_ok(namespace, "--inbound-mode", mode)
    assert_mode_installed(tables_state(namespace), mode)

    init_ok(namespace, "--cleanup")
    after = tables_state(namespace)
    assert_same_state(before, after, f"--cleanup after {mode} did not restore the tables")
    assert fwmark_rules(after) == []

    # Once more: nothing left to remove, still exit 0, still the same.
    init_ok(namespace, "--cleanup")
    assert_same_state(before, tables_state(namespace), "a second --cleanup changed the tables")


# --- 7. bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("args, option", [
    pytest.param(["--outbound-exclude-cidrs", "10.0.0.0/33"], "--outbound-exclude-cidrs", id="bad-cidr"),
    pytest.param(["--inbound-mode", "nat"], "--inbound-mode", id="bad-mode"),
])
def test_bad_option_exits_2_and_touches_nothing(busy_pod, args, option):
    namespace = busy_pod.pod
    init_ok(namespace)  # something of ours that a careless run could remove
    before = tables_state(namespace)
    for extra in ([], ["--cleanup"], ["--verify"]):
        done = init_iptables(namespace, *args, *extra)
        assert done.returncode == 2, describe(done)
        assert option in done.stderr, describe(done)
        assert "Traceback" not in done.stdout + done.stderr, describe(done)
    assert_same_state(before, tables_state(namespace), "a rejected option changed the tables")


# --- 8. no CAP_NET_ADMIN ---------------------------------------------------------------------

WITHOUT_NET_ADMIN = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"]
CAP_NET_ADMIN_BIT = 12


def test_without_net_admin_fails_cleanly(busy_pod):
    namespace = busy_pod.pod
    # The wrapper does drop it (root keeps every capability in its bounding set otherwise).
    status = run_in(namespace, [*WITHOUT_NET_ADMIN, "cat", "/proc/self/status"])
    cap_eff = int(re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    assert not cap_eff >> CAP_NET_ADMIN_BIT & 1, status

    before = tables_state(namespace)
    for args in ([], ["--inbound-mode", "tproxy", "--verify"], ["--cleanup"]):
        done = init_iptables(namespace, *args, prefix=WITHOUT_NET_ADMIN)
        assert done.returncode == 1, describe(done)
        assert "NET_ADMIN" in done.stderr, describe(done)
        assert "Traceback" not in done.stdout + done.stderr, describe(done)
    assert_same_state(before, tables_state(namespace), "a run without NET_ADMIN changed something")


# --- 9. dry run ------------------------------------------------------------------------------


def test_dry_run_prints_the_rules_and_changes_nothing(busy_pod):
    namespace = busy_pod.pod
    before = tables_state(namespace)

    done = init_ok(namespace, "--dry-run")
    assert "SIDECAR_OUTPUT" in done.stdout, describe(done)
    assert f"REDIRECT --to-ports {OUTBOUND_PORT}" in done.stdout, describe(done)
    assert f"REDIRECT --to-ports {INBOUND_PORT}" in done.stdout, describe(done)

    done = init_ok(namespace, "--dry-run", "--inbound-mode", "tproxy")
    assert "SIDECAR_OUTPUT" in done.stdout, describe(done)
    assert f"TPROXY --on-port {INBOUND_PORT}" in done.stdout, describe(done)

    assert_same_state(before, tables_state(namespace), "--dry-run changed something")
