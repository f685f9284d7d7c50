"""Readers of /proc for the benchmark harness (run.py): CPU time of a process,
of a process group and of whole cores, a process's RSS and descriptor limit,
and established TCP connections on a port. Linux only; they read, and start
or change nothing.

BenchmarkError, which they raise when /proc lacks a figure, is the harness's
error for everything that makes a run fail with a message.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class BenchmarkError(Exception):
    pass


def stat_fields(pid: int | str) -> list[str]:
    """Fields of /proc/<pid>/stat from the state (field 3 in proc(5)) on."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name before them may itself contain spaces and parentheses.
    return stat[stat.rindex(")") + 2:].split()


def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (all threads), in clock ticks."""
    fields = stat_fields(pid)
    return int(fields[11]) + int(fields[12])


def group_cpu_ticks(pgid: int) -> int:
    """utime + stime of every live process of a process group."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = stat_fields(entry.name)
            if int(fields[2]) == pgid:
                total += int(fields[11]) + int(fields[12])
    return total


def busy_ticks(cores: list[int]) -> int:
    """Ticks the given cores spent neither idle nor waiting for I/O."""
    total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.removeprefix("cpu") in map(str, cores):
            # user nice system idle iowait irq softirq steal; guest time is
            # already part of user and nice.
            ticks = [int(value) for value in values[:8]]
            total += sum(ticks) - ticks[3] - ticks[4]
    return total


def fd_soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise BenchmarkError(f"no open-files limit in /proc/{pid}/limits")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchmarkError(f"no VmRSS in /proc/{pid}/status")


def established_on_port(port: int) -> int:
    """TCP connections in state ESTABLISHED whose local port is `port`."""
    local_suffix = f":{port:04X}"
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            count += fields[1].endswith(local_suffix) and fields[3] == "01"
    return count
