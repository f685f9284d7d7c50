#!/usr/bin/env python3
"""Benchmark sidecar_proxy: wrk load on nginx, directly and through the proxy.

Usage: python3 benchmarks/run.py [--quick] [--duration S] [--json OUT]
benchmarks/README.md explains every figure. This is a developer tool; CI
must not run it. This module drives the run and takes the measurements; the
targets and scenarios are in settings.py, starting and stopping nginx and the
proxy in processes.py, the checks and machine info in environment.py, the
/proc readers in procfs.py and the printed report in report.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from environment import check_environment, check_ports_free, machine_info, raise_fd_limit
from processes import (STOP_GRACE_S, PortRedirects, Processes, Proxy, http_get, start_nginx,
                       start_proxy, wait_until)
from procfs import (BenchmarkError, busy_ticks, cpu_ticks, established_on_port, fd_soft_limit,
                    group_cpu_ticks, rss_mib)
from report import print_report
from settings import (ADMIN_PORT, BACKEND_PORT, HOST, IDLE_TARGET, LOAD_CORE, MTLS_PAIR, PROXY_CORE,
                      SCENARIOS, TARGETS, Scenario, Target)

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WRK_SCRIPT = BENCH_DIR / "wrk_report.lua"
IDLE_CLIENT = BENCH_DIR / "idle_clients.py"

IDLE_CONNECTIONS = 10_000
# Descriptors the proxy may open besides relayed connections while the idle
# test runs (admin requests, logging).
FD_MARGIN = 64
# Other load on the two cores, in cores, above which a run's figures are
# flagged; a quiet machine shows about 0.01.
OTHER_LOAD_LIMIT = 0.05
ACTIVE_METRIC = "sidecar_tcp_connections_active"
ORIGINATIONS_METRIC = "sidecar_tls_originations_total"
TERMINATIONS_METRIC = "sidecar_tls_terminations_total"

# Lets connections closed by a finished wrk run be torn down before the next
# CPU sample, so each run is charged for its own teardown only.
SETTLE_S = 0.5
CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def metric_by_label(text: str, name: str, *labels: str) -> dict[str, float]:
    """The samples of `name` summed by the values of `labels`, joined with "/"
    ({"mtls_chain_inner/ok": 54.0, ...}); empty if the metric is absent."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                key = "/".join(sample.labels.get(label, "") for label in labels)
                totals[key] = totals.get(key, 0) + sample.value
    return totals


def tls_handshakes() -> dict:
    """mTLS handshakes so far: originated by cluster and result, terminated
    by listener and result."""
    metrics = proxy_metrics()
    return {"originations": metric_by_label(metrics, ORIGINATIONS_METRIC, "cluster", "result"),
            "terminations": metric_by_label(metrics, TERMINATIONS_METRIC, "listener", "result")}


def handshakes_between(before: dict, after: dict) -> dict:
    return {kind: {key: value - before[kind].get(key, 0) for key, value in counts.items()
                   if value != before[kind].get(key, 0)}
            for kind, counts in after.items()}


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
    # A chain's handshakes, read outside the CPU samples so that rendering
    # /metrics is not charged to the run.
    handshakes_before = tls_handshakes() if target.hops else None
    before = CpuSample.take(proxy, nginx)
    wrk = run_wrk(processes, url, scenario.connections, duration_s)
    time.sleep(SETTLE_S)
    after = CpuSample.take(proxy, nginx)
    proxy.ensure_alive()
    handshakes = (handshakes_between(handshakes_before, tls_handshakes())
                  if handshakes_before is not None else None)

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
        # Chains only: mTLS handshakes during the measured run (the warm-up
        # filled the upstream pool, so a kept-alive run should make none).
        "tls_handshakes": handshakes,
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


def mtls_costs(rows: list[dict]) -> list[dict]:
    """Per scenario measured on both chains of MTLS_PAIR: their proxy CPU per
    request and the difference, what mTLS adds to a request for originating
    and terminating it (both ends are this one proxy)."""
    plain_name, mtls_name = MTLS_PAIR
    cost = {(row["scenario"], row["target"]): row["proxy_cpu_us_per_req"] for row in rows}
    costs = []
    for scenario in dict.fromkeys(row["scenario"] for row in rows):
        plain, mtls = cost.get((scenario, plain_name)), cost.get((scenario, mtls_name))
        if plain is None or mtls is None:
            continue
        costs.append({"scenario": scenario, "plain_us_per_req": plain, "mtls_us_per_req": mtls,
                      "added_us_per_req": mtls - plain, "ratio": ratio(mtls, plain)})
    return costs


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


# ------------------------------------------------------------------ main


def check_targets_answer(targets: list[Target]) -> None:
    """One request through every target before any measurement: a target
    that answers with an error (a 508 LOOP, a 503 from a failed mTLS
    handshake) would otherwise be measured as a fast one."""
    path = SCENARIOS[0].path
    for target in targets:
        try:
            status, body = http_get(target.port, path)
        except (OSError, http.client.HTTPException) as error:
            raise BenchmarkError(f"GET {path} through {target.name} failed: {error}") from None
        if status != 200:
            raise BenchmarkError(f"GET {path} through {target.name} answered {status}: {body.strip()!r}")


def run_benchmark(args: argparse.Namespace, workdir: Path, processes: Processes,
                  redirects: PortRedirects) -> dict:
    nginx = start_nginx(processes, workdir, args.fd_limit)
    proxy = start_proxy(processes, redirects, workdir, args.proxy_dir, args.targets)
    # Before any traffic, so that it is the footprint of the proxy alone.
    idle_rss = rss_mib(proxy.pid)
    # Compiled or source data path (README, "The compiled data path"): the figures depend on it.
    data_path = json.loads(http_get(ADMIN_PORT, "/server_info")[1])["data_path"]
    idle = measure_idle_connections(processes, proxy)
    # After the idle test, whose connection counts must not include the
    # pooled connections these requests leave behind.
    targets = [target for target in TARGETS if target.name in args.targets]
    check_targets_answer(targets)
    rows = [measure(processes, proxy, nginx, scenario, target, args.duration, args.warmup)
            for scenario in SCENARIOS for target in targets]
    add_ratios(rows)
    # Over the whole run, warm-ups included: with keep-alive on both hops, about
    # one origination per concurrent connection and scenario.
    handshakes = tls_handshakes() if any(target.hops for target in targets) else None
    exit_code = processes.stop(proxy.proc)
    log_lines = proxy.log.read_text(errors="replace").splitlines()
    return {
        "machine": {**machine_info(args.proxy_dir), "data_path": data_path},
        "settings": {"quick": args.quick, "duration_s": args.duration, "warmup_s": args.warmup,
                     "targets": [target.name for target in targets],
                     "proxy_core": PROXY_CORE, "load_core": LOAD_CORE,
                     "fd_limit": args.fd_limit, "idle_connections_wanted": IDLE_CONNECTIONS,
                     "active_metric": ACTIVE_METRIC, "other_load_limit": OTHER_LOAD_LIMIT,
                     "stop_grace_s": STOP_GRACE_S, "mtls_pair": list(MTLS_PAIR)},
        "idle_rss_mib": idle_rss,
        "idle_connections": idle,
        "scenarios": rows,
        "mtls": mtls_costs(rows),
        "tls_handshakes": handshakes,
        "proxy": {"exit_code": exit_code, "log_lines": len(log_lines), "log_tail": log_lines[-20:]},
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark sidecar_proxy against nginx with wrk.")
    parser.add_argument("--quick", action="store_true",
                        help="short runs for a smoke test (about a minute and a half in all)")
    parser.add_argument("--duration", type=int,
                        help="seconds per measured run (default 10, 3 with --quick)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write all figures to OUT")
    parser.add_argument("--proxy-dir", type=Path, default=REPO_DIR,
                        help="checkout whose sidecar_proxy is measured (default: this one)")
    parser.add_argument("--targets", metavar="NAME,...",
                        help="measure only these targets (default: all of "
                             f"{', '.join(target.name for target in TARGETS)})")
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
    known = [target.name for target in TARGETS]
    args.targets = (known if args.targets is None
                    else [name.strip() for name in args.targets.split(",")])
    unknown = [name for name in args.targets if name not in known]
    if unknown or not args.targets:
        parser.error(f"--targets: unknown {', '.join(unknown) or 'empty list'} "
                     f"(known: {', '.join(known)})")
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
    redirects = PortRedirects()
    try:
        check_environment()
        check_ports_free()
        args.fd_limit = raise_fd_limit()
        with work_directory(args.keep) as workdir:
            try:
                results = run_benchmark(args, workdir, processes, redirects)
            finally:
                # A second Ctrl-C must not cut the cleanup short.
                signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
                processes.stop_all()
                redirects.remove_all()
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
