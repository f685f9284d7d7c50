#!/usr/bin/env python3
"""Full mTLS handshakes per second per server core (not a test).

Usage: python3 benchmarks/tls_bench.py [--duration S] [--clients N] [--quick]

A server process (uvloop) accepts plain TCP, reads the client's first bytes,
runs the proxy's sniffer on them and upgrades with
``sidecar_proxy.tls.handshake.server_handshake`` (early bytes injected,
client certificate required, ``check_peer`` on the leaf), then echoes one
byte. Client processes (plain ``ssl``, blocking, a few threads each) open a
new connection per handshake with their own workload certificate, send a
byte, read it back and reset the connection (SO_LINGER 0: no TIME_WAIT pile-up
over a run). Every handshake is a full one: the server issues no tickets.

"handshakes/s per core" is the number of handshakes the server completed in
the measured window divided by the server process's CPU time (user + system,
``os.times``) in that window, so it does not depend on how many cores the
clients got. With two or more CPUs the server is pinned to the first and the
clients to the others, so they do not steal its core; "server core busy"
says how close to saturation the server ran (an idle-ish server pays more
wake-ups per handshake, so the per-core figure is conservative below ~90 %).
Rows:

- ``sniff + server_handshake``: the proxy's path (``sidecar_proxy.tls``);
- ``uvloop create_server(ssl=)``: uvloop terminating TLS itself on accept,
  no sniffing and no SPIFFE checks: the floor the proxy's path is compared with;
- TLS 1.2 and RSA-2048 for comparison with the ECDSA P-256 / TLS 1.3 default.

Also prints the server-side CPU of the OpenSSL handshake alone (two
SSLObjects over memory BIOs in one thread: no sockets, no event loop) and of
``check_peer`` alone, to show where a handshake's time goes.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar_proxy.tls import certs  # noqa: E402

TRUST_DOMAIN = "bench.test"


def make_pki(directory: Path, key_type: str) -> None:
    ca = certs.make_ca(TRUST_DOMAIN, key_type=key_type, days=2)
    for name in ("server", "client"):
        w = certs.issue_workload(ca, f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/{name}", key_type=key_type)
        certs.write_workload(directory / name, w, [ca.cert])


def _identity(d: Path):
    from sidecar_proxy.tls.identity import WorkloadIdentity
    return WorkloadIdentity.load(d / "cert.pem", d / "key.pem", d / "bundle.pem", now=time.time())


# --- server process

def _pin(cpus: set[int]) -> None:
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


def _cpu_split() -> tuple[set[int], set[int]]:
    """(server CPUs, client CPUs): the first available CPU for the server, the rest for the clients."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return set(), set()
    return {cpus[0]}, set(cpus[1:])


def server_main(mode: str, pki: str, conn, cpus: set[int]) -> None:
    _pin(cpus)
    import uvloop

    from sidecar_proxy.tls.contexts import server_context
    from sidecar_proxy.tls.handshake import HandshakeFailed, server_handshake
    from sidecar_proxy.transport.detect import Proto, sniff

    ctx = server_context(_identity(Path(pki) / "server"))
    stats = {"ok": 0, "failed": 0}

    class Echo(asyncio.Protocol):
        transport = None

        def connection_made(self, transport):  # native mode only: called after the handshake
            self.transport = transport
            stats["ok"] += 1

        def data_received(self, data):
            if self.transport is not None:
                self.transport.write(data)

        def eof_received(self):
            return False

    class Sniff(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.buf = b""

        def data_received(self, data):
            self.buf += data
            found = sniff(self.buf)
            if found is None:
                return
            self.transport.pause_reading()
            if found.proto is not Proto.TLS:
                self.transport.abort()
                return
            asyncio.get_running_loop().create_task(self.upgrade())

        async def upgrade(self):
            echo = Echo.__new__(Echo)
            echo.transport = None
            try:
                est = await server_handshake(asyncio.get_running_loop(), self.transport, echo, ctx, timeout=10,
                                             early=self.buf)
            except HandshakeFailed:
                stats["failed"] += 1
                return
            echo.transport = est.transport
            stats["ok"] += 1

    async def main():
        loop = asyncio.get_running_loop()
        if mode == "native":
            server = await loop.create_server(Echo, "127.0.0.1", 0, ssl=ctx, backlog=1024, ssl_handshake_timeout=10)
        else:
            server = await loop.create_server(Sniff, "127.0.0.1", 0, backlog=1024)
        conn.send(server.sockets[0].getsockname()[1])
        done = loop.create_future()
        marks = {}

        def on_command():
            cmd = conn.recv()
            t = os.times()
            marks[cmd] = (t.user + t.system, time.perf_counter(), stats["ok"], stats["failed"])
            if cmd == "stop":
                done.set_result(None)

        loop.add_reader(conn.fileno(), on_command)
        await done
        (c0, w0, n0, f0), (c1, w1, n1, f1) = marks["start"], marks["stop"]
        conn.send({"handshakes": n1 - n0, "failed": f1 - f0, "cpu": c1 - c0, "wall": w1 - w0})
        server.close()

    uvloop.run(main())


# --- client processes

def client_main(port: int, pki: str, max_version: str | None, threads: int, stop, cpus: set[int]) -> None:
    _pin(cpus)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    d = Path(pki) / "client"
    ctx.load_verify_locations(d / "bundle.pem")
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    if max_version == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    linger = struct.pack("ii", 1, 0)

    def worker():
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    # Without it the byte after the client's Finished waits out the server's delayed ACK (40 ms).
                    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    with ctx.wrap_socket(raw) as s:
                        s.sendall(b"x")
                        s.recv(1)
            except (OSError, ssl.SSLError):
                time.sleep(0.01)

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    stop.wait()
    for t in pool:
        t.join(15)


def run_one(mode: str, pki: Path, max_version: str | None, args) -> dict:
    spawn = mp.get_context("spawn")
    parent, child = spawn.Pipe()
    server_cpus, client_cpus = _cpu_split()
    server = spawn.Process(target=server_main, args=(mode, str(pki), child, server_cpus), daemon=True)
    server.start()
    try:
        if not parent.poll(30):
            raise SystemExit("the benchmark server did not start")
        port = parent.recv()
        stop = spawn.Event()
        clients = [spawn.Process(target=client_main, args=(port, str(pki), max_version, args.threads, stop, client_cpus),
                                 daemon=True) for _ in range(args.clients)]
        for c in clients:
            c.start()
        time.sleep(args.warmup)
        parent.send("start")
        time.sleep(args.duration)
        parent.send("stop")
        if not parent.poll(30):
            raise SystemExit("the benchmark server did not report")
        result = parent.recv()
        stop.set()
        for c in clients:
            c.join(20)
            if c.is_alive():
                c.kill()
        return result
    finally:
        server.join(10)
        if server.is_alive():
            server.kill()


def check_peer_cost(pki: Path) -> float:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from sidecar_proxy.tls.identity import check_peer
    leaf = x509.load_pem_x509_certificates((pki / "client" / "cert.pem").read_bytes())[0]
    der, now = leaf.public_bytes(Encoding.DER), time.time()
    n = 5000
    best = min(timeit.repeat(lambda: check_peer(der, now), number=n, repeat=5))
    return best / n * 1e6


def openssl_alone(pki: Path, max_version: str | None, n: int = 200) -> float:
    """Server-side CPU µs of one handshake, in memory (the floor under any event loop)."""
    from sidecar_proxy.tls.contexts import client_context, server_context
    sctx = server_context(_identity(pki / "server"))
    cctx = client_context(_identity(pki / "client"))
    if max_version == "1.2":
        cctx.maximum_version = ssl.TLSVersion.TLSv1_2
    server_cpu = 0.0
    for _ in range(n):
        s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        server, client = sctx.wrap_bio(s_in, s_out, server_side=True), cctx.wrap_bio(c_in, c_out)
        server_done = client_done = False
        while not (server_done and client_done):
            if not client_done:
                try:
                    client.do_handshake()
                    client_done = True
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            began = time.process_time()
            if not server_done:
                try:
                    server.do_handshake()
                    server_done = True
                except ssl.SSLWantReadError:
                    pass
            server_cpu += time.process_time() - began
            c_in.write(s_out.read())
    return server_cpu / n * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per row (default 5)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    p.add_argument("--threads", type=int, default=4, help="threads per client process (default 4)")
    p.add_argument("--quick", action="store_true", help="2 s per row, 0.5 s warm-up")
    args = p.parse_args()
    if args.quick:
        args.duration, args.warmup = 2.0, 0.5

    rows = [("sniff + server_handshake", "ec-p256", None, "proxy"),
            ("uvloop create_server(ssl=)", "ec-p256", None, "native"),
            ("sniff + server_handshake", "ec-p256", "1.2", "proxy"),
            ("sniff + server_handshake", "rsa-2048", None, "proxy")]
    import cryptography
    import uvloop
    print(f"# {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}, "
          f"uvloop {uvloop.__version__}, cryptography {cryptography.__version__}; "
          f"{args.clients}x{args.threads} client threads, {args.duration:g} s per row")
    server_cpus, client_cpus = _cpu_split()
    if server_cpus:
        print(f"# server pinned to CPU {sorted(server_cpus)}, clients to {sorted(client_cpus)}")
    print()
    print(f"| {'server path':28} | key      | TLS | handshakes | server CPU s | server core busy | handshakes/s | "
          f"**handshakes/s per core** | CPU per handshake |")
    print(f"|{'-' * 30}|----------|-----|-----------:|-------------:|-----------------:|-------------:|"
          f"--------------------------:|------------------:|")
    with tempfile.TemporaryDirectory(prefix="tls-bench-") as tmp:
        pkis = {}
        for key_type in ("ec-p256", "rsa-2048"):
            pkis[key_type] = Path(tmp) / key_type
            make_pki(pkis[key_type], key_type)
        for label, key_type, version, mode in rows:
            r = run_one(mode, pkis[key_type], version, args)
            per_core = r["handshakes"] / r["cpu"] if r["cpu"] else float("nan")
            print(f"| {label:28} | {key_type:8} | {version or '1.3'} | {r['handshakes']:10,} | {r['cpu']:12.2f} | "
                  f"{r['cpu'] / r['wall']:16.0%} | {r['handshakes'] / r['wall']:12,.0f} | {per_core:25,.0f} | "
                  f"{r['cpu'] / max(r['handshakes'], 1) * 1e6:14,.0f} µs |"
                  + (f" ({r['failed']} failed)" if r["failed"] else ""))
        print()
        for key_type, version in (("ec-p256", None), ("ec-p256", "1.2"), ("rsa-2048", None)):
            print(f"OpenSSL handshake alone, server side, in memory ({key_type}, TLS {version or '1.3'}): "
                  f"{openssl_alone(pkis[key_type], version):,.0f} µs")
        print(f"check_peer alone (parse the DER leaf, SVID rules): {check_peer_cost(pkis['ec-p256']):.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
