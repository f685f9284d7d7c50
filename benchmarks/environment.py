"""Checks and set-up before a benchmark run (tools, cores, free ports, the
descriptor limit), and the description of the machine that goes into the
results.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import importlib.util
import os
import platform
import resource
import shutil
import socket
import subprocess
from pathlib import Path

from procfs import BenchmarkError
from settings import ADMIN_PORT, BACKEND_PORT, HOST, LOAD_CORE, PROXY_CORE, TARGETS

# A relayed connection costs the proxy two descriptors, so 10,000 of them do
# not fit in a hard limit of 20,000, a common default.
FD_LIMIT_WANTED = 65_536


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
    # The proxy runs on this interpreter (sys.executable), so it sees the same packages.
    codecs = {listener["http"]["codec"] for target in TARGETS
              for listener in target.listeners().values() if "http" in listener}
    missing = sorted(codec for codec in codecs if importlib.util.find_spec(codec) is None)
    if missing:
        raise BenchmarkError(f"missing HTTP/1 codec package(s): {', '.join(missing)} "
                             f"(pip install -e . installs them)")
    cores = os.sched_getaffinity(0)
    if not {int(PROXY_CORE), int(LOAD_CORE)} <= cores:
        raise BenchmarkError(f"needs cores {PROXY_CORE} and {LOAD_CORE}; "
                             f"this process may use {sorted(cores)}")


def check_ports_free() -> None:
    ports = [ADMIN_PORT, BACKEND_PORT,
             *(listener["port"] for t in TARGETS for listener in t.listeners().values())]
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
        "httptools": package_version("httptools"),
        "h11": package_version("h11"),
        "nginx": tool_version(["nginx", "-v"]),
        "wrk": tool_version(["wrk", "-v"]),
        "proxy_commit": git_revision(proxy_dir),
    }
