"""Fixtures for the end-to-end tests that run the proxy in network namespaces.

* ``netns_pair``: a fresh pod/remote namespace pair (see ``netns.py``), deleted
  after the test. Tests that need namespaces skip when the machine can't give
  them, except under CI=true, where they fail instead.
* ``start_proxy``: starts ``python3 -m sidecar_proxy run`` inside the pod
  namespace with a given config and waits until it is ready; at teardown it is
  stopped with SIGTERM and must exit 0. Its log is attached to failed tests.
* ``start_upper_server``: a TCP server inside a namespace that answers every
  chunk it receives upper-cased and records who connected.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable

import pytest

from ..support import Proxy, stop_all
from . import netns

READY_TIMEOUT_S = 30.0
# Short so teardown is quick; tests close their connections before it anyway.
DRAIN_TIME_S = 2
LOG_TAIL_CHARS = 6000

_PROXIES = pytest.StashKey[list]()


@pytest.fixture
def netns_pair(_netns_ready):
    pair = netns.create_pair()
    yield pair
    pair.destroy()


# --- proxy ---------------------------------------------------------------------------------


def _proxy_wrapper(namespace: str, gid: int | None) -> Callable[[list[str]], list[str]]:
    def wrap(argv: list[str]) -> list[str]:
        if gid is not None:
            # Only the group changes: uid 0 keeps access to the root-owned
            # Python install, and iptables exempts the proxy by --gid-owner.
            argv = ["setpriv", f"--regid={gid}", "--clear-groups", *argv]
        return netns.exec_argv(namespace, argv)
    return wrap


@pytest.fixture
def start_proxy(request, netns_pair, tmp_path):
    """Factory: ``start_proxy(config, gid=None, namespace=None)`` runs a ready proxy in the pod namespace.

    ``config`` is the proxy's config as a dict; ``gid``, when given, is the
    group the proxy runs as; ``namespace``, when given, is where it runs
    instead of the pod namespace (e.g. ``netns_pair.remote``). Every proxy
    started is stopped at teardown and must exit 0.
    """
    proxies: list[Proxy] = []
    request.node.stash[_PROXIES] = proxies

    def start(config: dict, gid: int | None = None, namespace: str | None = None) -> Proxy:
        where = netns_pair.pod if namespace is None else namespace
        proxy = Proxy(config, tmp_path / f"proxy-{len(proxies)}", drain_time_s=DRAIN_TIME_S,
                      wrap=_proxy_wrapper(where, gid), enter=lambda: netns.entered(where))
        proxy.wait_ready(READY_TIMEOUT_S)
        proxies.append(proxy)
        return proxy

    yield start
    failures = stop_all(proxies, LOG_TAIL_CHARS)
    if failures:
        pytest.fail("\n\n".join(failures))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the log of every proxy a failed test started to its report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when == "call":
        for proxy in item.stash.get(_PROXIES, []):
            report.sections.append((f"proxy log ({proxy.log_path.parent.name})", proxy.log()[-LOG_TAIL_CHARS:]))


# --- upstream server -----------------------------------------------------------------------


class UpperServer:
    """TCP server that answers each chunk upper-cased and records its peers."""

    def __init__(self, namespace: str, host: str, port: int):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with netns.entered(namespace):
            self._listener = socket.create_server((host, port), family=family)
        # The accept loop wakes up regularly to notice stop().
        self._listener.settimeout(0.2)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._peers: list[tuple[str, int]] = []
        self._conns: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:  # listener closed by stop()
                return
            conn.settimeout(10.0)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self._peers.append((peer[0], peer[1]))
                self._conns.append(conn)
                self._threads.append(thread)
            thread.start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data.upper())
        except OSError:  # reset by the peer, timed out, or closed by stop()
            pass
        finally:
            conn.close()

    def wait_for_peers(self, count: int, timeout: float = 5.0) -> list[tuple[str, int]]:
        """(host, port) of the first connections accepted, once ``count`` have arrived or time is up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self._peers) >= count:
                    break
            time.sleep(0.02)
        with self._lock:
            return list(self._peers)

    def stop(self) -> None:
        self._stopping.set()
        self._listener.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            # shutdown wakes a thread blocked in recv; close alone would not.
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(timeout=2.0)


@pytest.fixture
def start_upper_server():
    """Factory: ``start_upper_server(namespace, host, port)``; servers stop at teardown."""
    servers: list[UpperServer] = []

    def start(namespace: str, host: str, port: int) -> UpperServer:
        server = UpperServer(namespace, host, port)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
