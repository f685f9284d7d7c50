#!/usr/bin/env python3
"""Benchmark sidecar_proxy: wrk load on nginx, directly and through the proxy.

Usage: python3 benchmarks/run.py [--quick] [--duration S] [--json OUT]
benchmarks/README.md explains every figure. This is a developer tool; CI
must not run it. The /proc readers are in procfs.py, the printed report in
report.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import http.client
import importlib.metadata
import json
import os
import platform
import pwd
import resource
import select
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from procfs import (BenchmarkError, busy_ticks, cpu_ticks, established_on_port, fd_soft_limit,
                    group_cpu_ticks, rss_mib)
from report import print_report

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
NGINX_TEMPLATE = BENCH_DIR / "nginx.conf.tmpl"
WRK_SCRIPT = BENCH_DIR / "wrk_report.lua"
IDLE_CLIENT = BENCH_DIR / "idle_clients.py"

HOST = "127.0.0.1"
ADMIN_PORT = 19000
BACKEND_PORT = 19080
PROXY_CORE = "0"
# wrk and nginx share the other core, so nothing competes with the proxy for
# its core and the proxy's CPU time is not inflated by cache or run-queue noise.
LOAD_CORE = "1"

IDLE_CONNECTIONS = 10_000
# A relayed connection costs the proxy two descriptors, so 10,000 of them do
# not fit in a hard limit of 20,000, a common default.
FD_LIMIT_WANTED = 65_536
# Descriptors the proxy may open besides relayed connections while the idle
# test runs (admin requests, logging).
FD_MARGIN = 64
# Other load on the two cores, in cores, above which a run's figures are
# flagged; a quiet machine shows about 0.01.
OTHER_LOAD_LIMIT = 0.05
ACTIVE_METRIC = "sidecar_tcp_connections_active"

DRAIN_TIME_S = 1
STOP_GRACE_S = DRAIN_TIME_S + 4
STARTUP_TIMEOUT_S = 15
# Lets connections closed by a finished wrk run be torn down before the next
# CPU sample, so each run is charged for its own teardown only.
SETTLE_S = 0.5
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where wrk sends requests. A target with a listener goes through the
    proxy: the listener, completed with address and port, is added to the
    proxy's config under the target's name."""

    name: str
    port: int
    listener: dict | None = None
    scheme: str = "http"

    @property
    def via_proxy(self) -> bool:
        return self.listener is not None


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One wrk workload, run against every target."""

    name: str
    path: str
    connections: int
    # The headline figure of a bulk scenario is GB/s rather than req/s.
    bulk: bool = False


TARGETS = (
    Target("direct", BACKEND_PORT),
    Target("proxy_l4", 19001, listener={"protocol": "tcp", "routes": "main"}),
)
# The target through which the idle-connection memory test connects.
IDLE_TARGET = "proxy_l4"

SCENARIOS = (
    # Direct req/s stops growing at about 25 connections on the 2-core machine
    # this was tuned on; 50 leaves headroom for a slower proxy to be saturated,
    # and more would only add queueing to the latency.
    Scenario("small keep-alive", "/small", connections=50),
    # Direct throughput is about flat from 1 to 8 streams; 4 keep the proxy
    # busy in both directions while wrk waits on the others.
    Scenario("1 MiB bulk", "/1m", connections=4, bulk=True),
)


# ---------------------------------------------------------------- processes


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


def proxy_config() -> dict:
    listeners = {target.name: {"address": HOST, "port": target.port, **target.listener}
                 for target in TARGETS if target.via_proxy}
    return {
        "version": 1,
        "node": {"id": "bench"},
        "admin": {"address": HOST, "port": ADMIN_PORT},
        "listeners": listeners,
        "clusters": {"backend": {"endpoints": [f"{HOST}:{BACKEND_PORT}"],
                                 "connect_timeout": "1s"}},
        "route_tables": {"main": [{"match": {}, "cluster": "backend"}]},
    }


def start_proxy(processes: Processes, workdir: Path, proxy_dir: Path) -> Proxy:
    config = workdir / "proxy.yaml"
    config.write_text(yaml.safe_dump(proxy_config(), sort_keys=False))
    log = workdir / "proxy.log"
    cmd = [sys.executable, "-m", "sidecar_proxy", "run", "--config", str(config),
           "--log-level", "warning", "--drain-time-s", str(DRAIN_TIME_S)]
    # cwd puts the checkout being measured first on sys.path, ahead of any
    # installed copy of sidecar_proxy.
    with log.open("ab") as output:
        proc = processes.start(cmd, PROXY_CORE, cwd=proxy_dir, stdout=output, stderr=output)
    wait_for_http_200(ADMIN_PORT, "/ready", proc, log, "the proxy")
    return Proxy(proc, log)


# ------------------------------------------------------------ measurements


@dataclasses.dataclass
class CpuSample:
    """CPU time used so far by the proxy, nginx, the reaped wrk runs and the
    two cores as a whole, to tell the proxy's share from other load."""

    at: float
    proxy_ticks: int
    nginx_ticks: int
    children_s: float
    busy_ticks: int

    @classmethod
    def take(cls, proxy: Proxy, nginx: subprocess.Popen) -> CpuSample:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(time.monotonic(), cpu_ticks(proxy.pid), group_cpu_ticks(nginx.pid),
                   usage.ru_utime + usage.ru_stime,
                   busy_ticks([int(PROXY_CORE), int(LOAD_CORE)]))


def idle_connection_count(pid: int) -> int:
    """IDLE_CONNECTIONS, or fewer if the proxy's descriptor limit (the one it
    really runs with, after raising it itself) cannot hold that many."""
    # Each relayed connection holds two descriptors: client side and upstream.
    room = (fd_soft_limit(pid) - len(os.listdir(f"/proc/{pid}/fd")) - FD_MARGIN) // 2
    if room < 1:
        raise BenchmarkError(f"the proxy's descriptor limit {fd_soft_limit(pid)} leaves no room "
                             f"for idle connections")
    return min(IDLE_CONNECTIONS, room)


def metric_value(text: str, name: str) -> float | None:
    """Sum of all samples of `name` (over all label sets), None if absent."""
    values = [sample.value for family in text_string_to_metric_families(text)
              for sample in family.samples if sample.name == name]
    return sum(values) if values else None


def proxy_metrics() -> str:
    status, body = http_get(ADMIN_PORT, "/metrics")
    if status != 200:
        raise BenchmarkError(f"GET /metrics answered {status}")
    return body


def run_wrk(processes: Processes, url: str, connections: int, duration_s: int) -> dict:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "-s", str(WRK_SCRIPT), url]
    proc = processes.start(cmd, LOAD_CORE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        output, _ = proc.communicate(timeout=duration_s + 30)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"wrk on {url} did not finish within {duration_s + 30} s") from None
    finally:
        processes.stop(proc)
    for line in output.splitlines():
        if line.startswith("WRK_JSON "):
            return json.loads(line.removeprefix("WRK_JSON "))
    raise BenchmarkError(f"wrk printed no summary for {url}:\n{output}")


def measure(processes: Processes, proxy: Proxy, nginx: subprocess.Popen, scenario: Scenario,
            target: Target, duration_s: int, warmup_s: int) -> dict:
    url = f"{target.scheme}://{HOST}:{target.port}{scenario.path}"
    run_wrk(processes, url, scenario.connections, warmup_s)
    time.sleep(SETTLE_S)
    before = CpuSample.take(proxy, nginx)
    wrk = run_wrk(processes, url, scenario.connections, duration_s)
    time.sleep(SETTLE_S)
    after = CpuSample.take(proxy, nginx)
    proxy.ensure_alive()

    seconds = wrk["duration_us"] / 1e6
    requests = wrk["requests"]
    cpu_s = (after.proxy_ticks - before.proxy_ticks) / CLK_TCK
    # wrk is the only child reaped between the two samples.
    nginx_s = (after.nginx_ticks - before.nginx_ticks) / CLK_TCK
    known_s = cpu_s + nginx_s + after.children_s - before.children_s
    foreign_s = (after.busy_ticks - before.busy_ticks) / CLK_TCK - known_s
    return {
        "scenario": scenario.name,
        "target": target.name,
        "via_proxy": target.via_proxy,
        "bulk": scenario.bulk,
        "url": url,
        "connections": scenario.connections,
        "seconds": round(seconds, 3),
        "requests": requests,
        "bytes": wrk["bytes"],
        "errors": sum(wrk["errors"].values()),
        "errors_by_kind": wrk["errors"],
        "req_per_s": requests / seconds,
        "gb_per_s": wrk["bytes"] / seconds / 1e9,
        "latency_ms": {key: value / 1000 for key, value in wrk["latency_us"].items()},
        # The proxy serves nothing in a direct run, so its figures would be noise.
        "proxy_cpu_us_per_req": cpu_s * 1e6 / requests if target.via_proxy and requests else None,
        "proxy_cpu_cores": cpu_s / seconds if target.via_proxy else None,
        "proxy_rss_mib": rss_mib(proxy.pid) if target.via_proxy else None,
        # CPU time on the two cores not used by the proxy, nginx or wrk (other
        # programs, and kernel work not charged to a process), in cores.
        "other_cpu_cores": foreign_s / (after.at - before.at),
    }


def ratio(value: float, base: float) -> float | None:
    # A run that completed no request has zero figures.
    return value / base if value and base else None


def add_ratios(rows: list[dict]) -> None:
    """Adds proxied/direct ratios to every proxied row."""
    direct = {row["scenario"]: row for row in rows if not row["via_proxy"]}
    for row in rows:
        base = direct.get(row["scenario"])
        if not row["via_proxy"] or base is None:
            continue
        row["vs_direct"] = {
            "req_per_s": ratio(row["req_per_s"], base["req_per_s"]),
            "p50": ratio(row["latency_ms"]["p50"], base["latency_ms"]["p50"]),
            "p99": ratio(row["latency_ms"]["p99"], base["latency_ms"]["p99"]),
        }


def read_answer(proc: subprocess.Popen, timeout_s: float) -> dict:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise BenchmarkError(f"the idle-connection client gave no answer within {timeout_s} s "
                             f"(exit code {proc.poll()})")
    return json.loads(line)


def ask(proc: subprocess.Popen, command: str, timeout_s: float = 30) -> dict:
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    return read_answer(proc, timeout_s)


def relay_counts() -> dict:
    metrics = proxy_metrics()
    return {"proxy_metric": metric_value(metrics, ACTIVE_METRIC),
            "backend_established": established_on_port(BACKEND_PORT)}


def measure_idle_connections(processes: Processes, proxy: Proxy) -> dict:
    target = next(target for target in TARGETS if target.name == IDLE_TARGET)
    count = idle_connection_count(proxy.pid)
    rss_before = rss_mib(proxy.pid)
    client = processes.start(
        [sys.executable, str(IDLE_CLIENT), "--host", HOST, "--port", str(target.port),
         "--count", str(count)],
        LOAD_CORE, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        opened = read_answer(client, timeout_s=120)

        # A proxy without the metric is checked on the backend side only.
        def all_relayed() -> bool:
            counts = relay_counts()
            metric = counts["proxy_metric"]
            return (counts["backend_established"] >= opened["connected"]
                    and (metric is None or metric >= opened["connected"]))

        # Connections that completed the handshake may still wait in the
        # accept queue, or for their upstream connection.
        relayed_in_time = wait_until(all_relayed, timeout_s=20, interval_s=0.25)
        held = relay_counts()
        rss_with = rss_mib(proxy.pid)
        still_open = ask(client, "check")["open"]
        ask(client, "close")
    finally:
        processes.stop(client)
    proxy.ensure_alive()
    wait_until(lambda: relay_counts()["backend_established"] == 0, timeout_s=20, interval_s=0.25)
    after = relay_counts()
    return {
        "target": target.name,
        "requested": count,
        "connected": opened["connected"],
        "failed": opened["failed"],
        "connect_seconds": opened["seconds"],
        "open_at_client_after_hold": still_open,
        "relayed_within_timeout": relayed_in_time,
        "proxy_active_metric": held["proxy_metric"],
        "backend_established": held["backend_established"],
        "proxy_active_metric_after_close": after["proxy_metric"],
        "backend_established_after_close": after["backend_established"],
        "rss_before_mib": rss_before,
        "rss_with_connections_mib": rss_with,
        "rss_added_mib": rss_with - rss_before,
        # Linear scaling, for a run whose descriptor limit forced fewer connections.
        f"rss_added_per_{IDLE_CONNECTIONS}_mib": (rss_with - rss_before) * IDLE_CONNECTIONS / count,
        "proxy_fd_limit": fd_soft_limit(proxy.pid),
        "rss_after_close_mib": rss_mib(proxy.pid),
    }


# ------------------------------------------------------------ environment


def raise_fd_limit() -> int:
    """Raises RLIMIT_NOFILE, which every child inherits, as far as allowed
    (a hard limit goes up only with CAP_SYS_RESOURCE); returns the limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < FD_LIMIT_WANTED:
        with contextlib.suppress(ValueError, PermissionError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT_WANTED, FD_LIMIT_WANTED))
            hard = FD_LIMIT_WANTED
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def check_environment() -> None:
    missing = [tool for tool in ("wrk", "nginx", "taskset") if shutil.which(tool) is None]
    if missing:
        raise BenchmarkError(f"missing tools: {', '.join(missing)} "
                             f"(apt-get install wrk nginx-light util-linux)")
    cores = os.sched_getaffinity(0)
    if not {int(PROXY_CORE), int(LOAD_CORE)} <= cores:
        raise BenchmarkError(f"needs cores {PROXY_CORE} and {LOAD_CORE}; "
                             f"this process may use {sorted(cores)}")


def check_ports_free() -> None:
    ports = [ADMIN_PORT, BACKEND_PORT, *(t.port for t in TARGETS if t.via_proxy)]
    busy = []
    for port in ports:
        with socket.socket() as probe:
            # As the servers themselves will: connections in TIME_WAIT from a
            # previous run do not make the port busy.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((HOST, port))
                probe.listen()
            except OSError:
                busy.append(port)
    if busy:
        raise BenchmarkError(f"port(s) {', '.join(map(str, busy))} on {HOST} already in use; "
                             f"see `ss -ltnp` for who holds them")


def run_quietly(cmd: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None


def tool_version(cmd: list[str]) -> str | None:
    result = run_quietly(cmd)
    # nginx -v writes to stderr; wrk -v exits with 1 after its version line.
    output = (result.stdout or result.stderr).strip() if result else ""
    return output.splitlines()[0] if output else None


def git_revision(checkout: Path) -> str | None:
    head = run_quietly(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"])
    if head is None or head.returncode != 0:
        return None
    status = run_quietly(["git", "-C", str(checkout), "status", "--porcelain"])
    dirty = status is not None and bool(status.stdout.strip())
    return head.stdout.strip() + ("-dirty" if dirty else "")


def cpu_model() -> str | None:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def package_version(name: str) -> str | None:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(name)
    return None


def machine_info(proxy_dir: Path) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": package_version("uvloop"),
        "nginx": tool_version(["nginx", "-v"]),
        "wrk": tool_version(["wrk", "-v"]),
        "proxy_commit": git_revision(proxy_dir),
    }


# ------------------------------------------------------------------ main


def run_benchmark(args: argparse.Namespace, workdir: Path, processes: Processes) -> dict:
    nginx = start_nginx(processes, workdir, args.fd_limit)
    proxy = start_proxy(processes, workdir, args.proxy_dir)
    # Before any traffic, so that it is the footprint of the proxy alone.
    idle_rss = rss_mib(proxy.pid)
    idle = measure_idle_connections(processes, proxy)
    rows = [measure(processes, proxy, nginx, scenario, target, args.duration, args.warmup)
            for scenario in SCENARIOS for target in TARGETS]
    add_ratios(rows)
    exit_code = processes.stop(proxy.proc)
    log_lines = proxy.log.read_text(errors="replace").splitlines()
    return {
        "machine": machine_info(args.proxy_dir),
        "settings": {"quick": args.quick, "duration_s": args.duration, "warmup_s": args.warmup,
                     "proxy_core": PROXY_CORE, "load_core": LOAD_CORE,
                     "fd_limit": args.fd_limit, "idle_connections_wanted": IDLE_CONNECTIONS,
                     "active_metric": ACTIVE_METRIC, "other_load_limit": OTHER_LOAD_LIMIT,
                     "stop_grace_s": STOP_GRACE_S},
        "idle_rss_mib": idle_rss,
        "idle_connections": idle,
        "scenarios": rows,
        "proxy": {"exit_code": exit_code, "log_lines": len(log_lines), "log_tail": log_lines[-20:]},
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark sidecar_proxy against nginx with wrk.")
    parser.add_argument("--quick", action="store_true",
                        help="short runs for a smoke test (under a minute in all)")
    parser.add_argument("--duration", type=int,
                        help="seconds per measured run (default 10, 3 with --quick)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write all figures to OUT")
    parser.add_argument("--proxy-dir", type=Path, default=REPO_DIR,
                        help="checkout whose sidecar_proxy is measured (default: this one)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="work in DIR (created, must not exist) and keep the configs and "
                             "the proxy's and nginx's logs there")
    args = parser.parse_args()
    if args.duration is None:
        args.duration = 3 if args.quick else 10
    if args.duration < 1:
        parser.error("--duration must be at least 1")
    args.warmup = 1 if args.quick else 2
    args.proxy_dir = args.proxy_dir.resolve()
    if args.keep and args.keep.exists():
        parser.error(f"--keep {args.keep}: already exists")
    return args


@contextlib.contextmanager
def work_directory(keep: Path | None):
    if keep:
        keep.mkdir(parents=True)
        yield keep.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as tmp:
        yield Path(tmp)


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def exit_on_signal(signum: int, _frame) -> None:
    # Turns SIGTERM and SIGHUP into an exception, so that cleanup runs as on Ctrl-C.
    raise SystemExit(128 + signum)


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGHUP, exit_on_signal)
    processes = Processes()
    try:
        check_environment()
        check_ports_free()
        args.fd_limit = raise_fd_limit()
        with work_directory(args.keep) as workdir:
            try:
                results = run_benchmark(args, workdir, processes)
            finally:
                # A second Ctrl-C must not cut the cleanup short.
                signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
                processes.stop_all()
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    except BenchmarkError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
