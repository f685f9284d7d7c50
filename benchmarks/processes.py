"""The processes the benchmark harness (run.py) starts, and how it starts,
waits for and stops them: nginx as the backend, the proxy, and the Processes
registry through which every child (wrk and the idle client too) is started
pinned to a core and stopped on exit. Also what the proxy's config needs set
up around it: the mTLS certificate of the chain targets and the iptables
rules that lead a chain back into the proxy (PortRedirects).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import os
import pwd
import shutil
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import yaml

from procfs import BenchmarkError
from settings import (ADMIN_PORT, BACKEND_PORT, CLUSTERS, HOST, IDLE_TARGET, LOAD_CORE, PROXY_CORE,
                      ROUTE_TABLES, TARGETS, TRUST_DOMAIN, WORKLOAD_ID)

NGINX_TEMPLATE = Path(__file__).resolve().parent / "nginx.conf.tmpl"
# The harness's own checkout, which makes the mTLS certificates whichever
# checkout is measured.
REPO_DIR = Path(__file__).resolve().parent.parent

DRAIN_TIME_S = 1
# How long Processes.stop waits after SIGTERM: the proxy drains for
# DRAIN_TIME_S first, and the rest is headroom for its shutdown.
STOP_GRACE_S = DRAIN_TIME_S + 4
STARTUP_TIMEOUT_S = 15
REDIRECT_COMMENT = "sidecar-proxy-benchmark"


class Processes:
    """Every process the harness starts. Each runs in its own session, so a
    Ctrl-C on the terminal reaches only the harness, and stopping a process
    group also stops its children (nginx's worker)."""

    def __init__(self) -> None:
        self._running: list[subprocess.Popen] = []

    def start(self, cmd: list[str], core: str, **popen_args) -> subprocess.Popen:
        proc = subprocess.Popen(["taskset", "-c", core, *cmd], start_new_session=True,
                                **popen_args)
        self._running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> int | None:
        """SIGTERM, then SIGKILL after a grace period, to the process group.
        Returns the exit code, or None if the process had to be killed."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            code = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self._running.remove(proc)
        return code

    def stop_all(self) -> None:
        for proc in reversed(self._running[:]):
            self.stop(proc)


class PortRedirects:
    """The iptables rules that send a chain's connections to its inner
    listener (see settings.Hop): nat OUTPUT, REDIRECT from HOST:via_port to
    the hop's port, tagged with REDIRECT_COMMENT. Added when the proxy
    starts, removed on exit like the processes (Processes.stop_all)."""

    def __init__(self) -> None:
        self._added: list[list[str]] = []

    @staticmethod
    def _rule(via_port: int, port: int) -> list[str]:
        return ["OUTPUT", "-p", "tcp", "-d", HOST, "--dport", str(via_port),
                "-m", "comment", "--comment", REDIRECT_COMMENT,
                "-j", "REDIRECT", "--to-ports", str(port)]

    @staticmethod
    def _iptables(action: str, rule: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(["iptables", "-w", "5", "-t", "nat", action, *rule],
                              capture_output=True, text=True)

    def add(self, via_port: int, port: int) -> None:
        if shutil.which("iptables") is None:
            raise BenchmarkError("the chain targets need iptables (apt-get install iptables) to "
                                 "redirect to their inner listener; leave them out with --targets")
        rule = self._rule(via_port, port)
        # A rule left behind by a run that was killed: replaced, not doubled.
        while self._iptables("-D", rule).returncode == 0:
            pass
        added = self._iptables("-A", rule)
        if added.returncode != 0:
            raise BenchmarkError(f"the chain targets need a nat rule redirecting {HOST}:{via_port} to "
                                 f"port {port} (root, iptables with nat); iptables said: "
                                 f"{added.stderr.strip()}; leave them out with --targets")
        self._added.append(rule)

    def remove_all(self) -> None:
        while self._added:
            self._iptables("-D", self._added.pop())


@dataclasses.dataclass
class Proxy:
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ensure_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchmarkError(f"the proxy exited with code {self.proc.returncode}; "
                                 f"its log ends with:\n{log_tail(self.log)}")


def log_tail(path: Path, lines: int = 20) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:]) or "(nothing)"


def wait_until(predicate, timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def http_get(port: int, path: str) -> tuple[int, str]:
    # http.client rather than urllib: urllib would honour http_proxy variables.
    conn = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def wait_for_http_200(port: int, path: str, proc: subprocess.Popen, log: Path, what: str) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise BenchmarkError(f"{what} exited with code {proc.returncode} while starting; "
                                 f"its log ends with:\n{log_tail(log)}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            return http_get(port, path)[0] == 200
        return False

    if not wait_until(ready, STARTUP_TIMEOUT_S):
        raise BenchmarkError(f"{what} did not answer 200 on {HOST}:{port}{path} within "
                             f"{STARTUP_TIMEOUT_S} s; its log ends with:\n{log_tail(log)}")


def start_nginx(processes: Processes, workdir: Path, fd_limit: int) -> subprocess.Popen:
    docroot = workdir / "www"
    docroot.mkdir()
    (docroot / "1m").write_bytes(os.urandom(1 << 20))
    conf = workdir / "nginx.conf"
    conf.write_text(string.Template(NGINX_TEMPLATE.read_text()).substitute(
        user=pwd.getpwuid(os.geteuid()).pw_name, prefix=workdir, docroot=docroot,
        address=HOST, port=BACKEND_PORT,
        # nginx holds one descriptor per connection; the rest is headroom.
        rlimit_nofile=fd_limit, worker_connections=fd_limit - 1024))
    log = workdir / "nginx-error.log"
    with log.open("ab") as stderr:
        proc = processes.start(["nginx", "-c", str(conf), "-p", str(workdir)], LOAD_CORE,
                               stdout=subprocess.DEVNULL, stderr=stderr)
    wait_for_http_200(BACKEND_PORT, "/small", proc, log, "nginx")
    return proc


def proxy_config(names: list[str]) -> dict:
    """Listeners for the proxied targets in `names` (and IDLE_TARGET, which the
    idle-connection test always uses), with only the route tables and clusters
    they name, so that a checkout without the L7 path (or without policies, or
    mTLS) can still be measured with `--targets direct,proxy_l4` (or without
    the targets that need them). The top-level `tls` section an mTLS target
    needs is added by start_proxy (see needs_mtls)."""
    listeners = {name: {"address": HOST, **listener}
                 for target in TARGETS
                 if target.via_proxy and (target.name in names or target.name == IDLE_TARGET)
                 for name, listener in target.listeners().items()}
    tables = {listener["routes"] for listener in listeners.values()}
    clusters = {route["cluster"] for name in tables for route in ROUTE_TABLES[name]}
    return {
        "version": 1,
        "node": {"id": "bench"},
        "admin": {"address": HOST, "port": ADMIN_PORT},
        "listeners": listeners,
        "clusters": {name: cluster for name, cluster in CLUSTERS.items() if name in clusters},
        "route_tables": {name: routes for name, routes in ROUTE_TABLES.items() if name in tables},
    }


def needs_mtls(config: dict) -> bool:
    """Whether a listener or cluster of `config` has a `tls` setting, which
    needs the top-level `tls` section (the workload certificate)."""
    return any("tls" in part for section in ("listeners", "clusters")
               for part in config[section].values())


def make_workload_identity(directory: Path) -> dict:
    """Writes a CA and one ECDSA P-256 workload certificate (WORKLOAD_ID) into
    `directory` and returns the proxy's top-level `tls` section pointing at
    them. Both ends of the mTLS hop are the same proxy, so one certificate
    serves for originating and for terminating."""
    if str(REPO_DIR) not in sys.path:
        sys.path.insert(0, str(REPO_DIR))
    from sidecar_proxy.tls import certs

    ca = certs.make_ca(TRUST_DOMAIN, key_type="ec-p256", days=2)
    workload = certs.issue_workload(ca, WORKLOAD_ID, key_type="ec-p256")
    certs.write_workload(directory, workload, [ca.cert])
    return {"cert_chain": str(directory / certs.CERT_FILE),
            "private_key": str(directory / certs.KEY_FILE),
            "trust_bundle": str(directory / certs.BUNDLE_FILE)}


def start_proxy(processes: Processes, redirects: PortRedirects, workdir: Path, proxy_dir: Path,
                targets: list[str]) -> Proxy:
    for target in TARGETS:
        if target.name in targets:
            for hop in target.hops:
                redirects.add(hop.via_port, hop.port)
    config = workdir / "proxy.yaml"
    document = proxy_config(targets)
    if needs_mtls(document):
        document["tls"] = make_workload_identity(workdir / "pki")
    if (proxy_dir / "sidecar_proxy" / "config" / "telemetry.py").exists():
        # Metrics on (the default), scraped on the admin port only; no access log, which would write
        # a line per request into proxy.log. Telemetry's own costs: l7_micro.py --telemetry.
        document["telemetry"] = {"metrics": {"port": 0}, "access_log": {"enabled": False}}
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    log = workdir / "proxy.log"
    cmd = [sys.executable, "-m", "sidecar_proxy", "run", "--config", str(config),
           "--log-level", "warning", "--drain-time-s", str(DRAIN_TIME_S)]
    # cwd puts the checkout being measured first on sys.path, ahead of any
    # installed copy of sidecar_proxy.
    with log.open("ab") as output:
        proc = processes.start(cmd, PROXY_CORE, cwd=proxy_dir, stdout=output, stderr=output)
    wait_for_http_200(ADMIN_PORT, "/ready", proc, log, "the proxy")
    return Proxy(proc, log)
