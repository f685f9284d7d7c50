"""Linux network-namespace plumbing for the end-to-end tests.

Two namespaces stand in for a pod and a remote host, joined by a veth pair:

    pod    eth0 10.222.0.1/24  fd00:222::1/64  <--veth-->  eth0 10.222.0.2/24  fd00:222::2/64    remote

Every device is created directly inside the namespaces (none ever appears in
the host namespace), so deleting the two namespaces removes the veth pair, the
addresses and any iptables rules added inside them: nothing else needs undoing.

Namespace names are ``<PREFIX>-<pid>-<n>-pod`` / ``...-remote``. The pid makes
them unique per test process, so parallel runs don't collide, and it lets a
later run recognise namespaces left behind by an aborted run (their pid is gone)
and delete them.

Code can run inside a namespace in two ways:

* as a separate process: :func:`exec_argv`, :func:`run_in`, :func:`popen_in`
  (``ip netns exec``), used for the proxy and for iptables;
* in this process: :func:`entered` moves the calling thread into the namespace
  for the duration of a ``with`` block. A socket belongs to the namespace it was
  created in for its whole life, so tests create client and server sockets this
  way and then use them from anywhere, with ordinary Python timeouts.

All of this needs root.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import signal
import socket
import subprocess
from dataclasses import dataclass
from typing import Iterator, Sequence

PREFIX = "spe2e"

POD_V4 = "10.222.0.1"
REMOTE_V4 = "10.222.0.2"
POD_V6 = "fd00:222::1"
REMOTE_V6 = "fd00:222::2"

# Interface name on both ends; it is per-namespace, so it never clashes.
VETH = "eth0"

# Bound on every helper command; they are all instantaneous when healthy.
COMMAND_TIMEOUT_S = 10.0

_NETNS_DIR = "/run/netns"
_CLONE_NEWNET = 0x40000000
_names = itertools.count()
# os.setns only exists from Python 3.12, so call libc directly.
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    """A namespace command failed; the message carries its stderr."""


def exec_argv(namespace: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` inside ``namespace``.

    ``ip netns exec`` execs ``argv`` in place, so the process it starts *is* the
    command (signals sent to it reach the command directly).
    """
    return ["ip", "netns", "exec", namespace, *argv]


def run(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT_S) -> str:
    """Run a command to completion and return its stdout; raise NetnsError on failure."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"{' '.join(argv)}: no exit within {timeout}s") from exc
    if done.returncode != 0:
        raise NetnsError(
            f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}"
        )
    return done.stdout


def run_in(namespace: str, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT_S) -> str:
    """Run a command inside ``namespace`` to completion; see :func:`run`."""
    return run(exec_argv(namespace, argv), timeout)


def popen_in(namespace: str, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """Start a long-running command inside ``namespace``; the caller must stop it."""
    return subprocess.Popen(exec_argv(namespace, argv), **popen_kwargs)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@contextlib.contextmanager
def entered(namespace: str) -> Iterator[None]:
    """Run the ``with`` body with the calling thread inside ``namespace``.

    Only the calling thread moves (a network namespace is a per-thread
    attribute), and it moves back when the block ends, even on error.
    Sockets created inside the block stay in ``namespace`` afterwards.
    """
    # /proc/thread-self, not /proc/self: the latter is the main thread's view.
    with open("/proc/thread-self/ns/net", "rb") as home, open(
        os.path.join(_NETNS_DIR, namespace), "rb"
    ) as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


def connect_from(namespace: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """Open a TCP connection from inside ``namespace``; socket timeouts are ``timeout``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with entered(namespace):
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class NetnsPair:
    """A pod namespace and a remote namespace joined by a veth pair."""

    pod: str
    remote: str

    def destroy(self) -> None:
        """Delete both namespaces (and with them the veth pair and all rules).

        Tries both even if the first deletion fails, then reports the failures.
        """
        errors = []
        for name in (self.pod, self.remote):
            try:
                delete_namespace(name)
            except NetnsError as exc:
                errors.append(str(exc))
        if errors:
            raise NetnsError("; ".join(errors))


def delete_namespace(name: str) -> None:
    """Kill whatever still runs in a namespace, then delete it.

    A process left inside (a proxy of a test that crashed, or of an aborted
    run) would otherwise keep the namespace alive, unnamed and unreachable,
    after ``ip netns delete``. A namespace that is already gone is not an error.
    """
    if not os.path.exists(os.path.join(_NETNS_DIR, name)):
        return
    for pid in run(["ip", "netns", "pids", name]).split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    run(["ip", "netns", "delete", name])


def _configure_end(namespace: str, v4: str, v6: str) -> None:
    run(["ip", "-n", namespace, "link", "set", "lo", "up"])
    run(["ip", "-n", namespace, "addr", "add", f"{v4}/24", "dev", VETH])
    # nodad: skip duplicate address detection so the address is usable at once
    # instead of sitting "tentative" (unbindable) for about a second.
    run(["ip", "-n", namespace, "-6", "addr", "add", f"{v6}/64", "dev", VETH, "nodad"])
    run(["ip", "-n", namespace, "link", "set", VETH, "up"])


def create_pair() -> NetnsPair:
    """Create a fresh pod/remote namespace pair; on failure nothing is left behind."""
    base = f"{PREFIX}-{os.getpid()}-{next(_names)}"
    pair = NetnsPair(pod=f"{base}-pod", remote=f"{base}-remote")
    try:
        run(["ip", "netns", "add", pair.pod])
        run(["ip", "netns", "add", pair.remote])
        # Created inside the pod namespace with its peer placed straight into
        # the remote one: the pair never exists in the host namespace.
        run(["ip", "-n", pair.pod, "link", "add", VETH, "type", "veth",
             "peer", "name", VETH, "netns", pair.remote])
        _configure_end(pair.pod, POD_V4, POD_V6)
        _configure_end(pair.remote, REMOTE_V4, REMOTE_V6)
    except BaseException:
        with contextlib.suppress(NetnsError):
            pair.destroy()
        raise
    return pair


def _owner_pid(name: str) -> int | None:
    """The pid embedded in one of our namespace names, or None if it is not ours."""
    parts = name.split("-")
    if len(parts) < 3 or parts[0] != PREFIX or not parts[1].isdigit():
        return None
    return int(parts[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces left by earlier test processes that no longer run.

    Namespaces of live processes (a parallel run, or this one) are kept.
    Returns the names deleted.
    """
    if not os.path.isdir(_NETNS_DIR):
        return []
    stale = []
    for name in sorted(os.listdir(_NETNS_DIR)):
        pid = _owner_pid(name)
        if pid is not None and not _pid_alive(pid):
            delete_namespace(name)
            stale.append(name)
    return stale


def unavailable_reason() -> str | None:
    """Why namespaces can't be used here, or None when they can.

    Checks exactly what the tests need first: root, and a working
    ``ip netns add`` (which fails without iproute2, CAP_SYS_ADMIN or netns
    support, e.g. in some containers).
    """
    if os.geteuid() != 0:
        return "needs root (network namespaces and iptables)"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        run(["ip", "netns", "add", probe])
    except (NetnsError, OSError) as exc:
        return f"'ip netns add' does not work here: {exc}"
    delete_namespace(probe)
    return None
