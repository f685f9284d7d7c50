"""Open many idle TCP connections and hold them until told to close them.

Run by benchmarks/run.py as a separate process, so that the harness's own
file descriptors and memory stay out of the way. Protocol on stdin/stdout,
one JSON line per answer:

  (on start)  -> {"connected": N, "failed": F, "seconds": S}
  check       -> {"open": K}    connections the peer has not closed
  close       -> {"closed": N}  then the process exits

EOF on stdin also closes everything and exits.
"""

import argparse
import asyncio
import json
import resource
import socket
import sys
import time

# Connects in flight at once: enough to be fast, few enough to stay well below
# the accept backlog of the listener, whose overflow costs a 1 s SYN retry.
PARALLEL_CONNECTS = 256
CONNECT_TIMEOUT_S = 5.0
# Sockets, plus stdio and the event loop's own descriptors.
SPARE_FDS = 64


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    # Raising the hard limit needs root; without it the soft limit can still
    # go up to the hard one, and missing descriptors show up as failed connects.
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(needed, hard), max(needed, hard)))
    except (ValueError, PermissionError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def connect_one(host: str, port: int, gate: asyncio.Semaphore) -> socket.socket | None:
    async with gate:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)),
                                   CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            sock.close()
            return None
        return sock


async def open_all(host: str, port: int, count: int) -> list[socket.socket | None]:
    gate = asyncio.Semaphore(PARALLEL_CONNECTS)
    return await asyncio.gather(*(connect_one(host, port, gate) for _ in range(count)))


def is_open(sock: socket.socket) -> bool:
    # A peek that returns b"" means the peer sent FIN; no data yet is the
    # normal state of an idle connection.
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def answer(message: dict) -> None:
    print(json.dumps(message), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()

    raise_fd_limit(args.count + SPARE_FDS)
    started = time.monotonic()
    results = asyncio.run(open_all(args.host, args.port, args.count))
    socks = [sock for sock in results if sock is not None]
    answer({"connected": len(socks), "failed": args.count - len(socks),
            "seconds": round(time.monotonic() - started, 3)})

    for line in sys.stdin:
        command = line.strip()
        if command == "check":
            answer({"open": sum(is_open(sock) for sock in socks)})
        elif command == "close":
            break
        else:
            answer({"error": f"unknown command {command!r}"})
    for sock in socks:
        sock.close()
    answer({"closed": len(socks)})


if __name__ == "__main__":
    main()
