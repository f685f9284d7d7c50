"""The control server: serves listeners, routes, clusters and endpoints from files.

``sidecar-proxy control-server --dir PATH`` reads ``listeners.yaml``,
``routes.yaml``, ``clusters.yaml`` and ``endpoints.yaml`` (YAML or JSON, each
a list of resource objects; a missing file is an empty list) and answers
``POST /v3/discovery:<type>`` (see :mod:`.protocol`).

Invariants:

- A type's version is a digest of its canonical JSON, so unchanged content
  keeps its version whatever happens to the file, and nothing is pushed.
- A file that does not parse keeps the previous version served; the error is
  logged and shown on ``/status``. Resources are not checked against the
  proxy's config rules: the client does that and NACKs.
- A request is answered at once only when the version the client has seen
  differs from the current one. For a NACK the version seen is the rejected
  one (looked up by the nonce the NACK answers), so a rejected version is
  never re-sent in a loop: the next answer waits for the files to change.
- Memory is bounded: a few nonces per node and type, nodes forgotten after
  ``NODE_TTL_S`` without a request, at most ``MAX_NODES`` nodes, NACK
  messages cut to ``MAX_ERROR_CHARS``.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..admin.server import AdminServer, Request, Response, json_response, text_response
from ..config import load
from ..limits import raise_fd_limit
from . import protocol

log = logging.getLogger("sidecar_proxy.control.server")

FILES = {t: f"{t}.yaml" for t in protocol.TYPES}
NONCE_HISTORY = 16
NODE_TTL_S = 600.0
MAX_NODES = 10_000
MAX_NODE_ID_CHARS = 256
MAX_ERROR_CHARS = 4096
# Enough for thousands of nodes, each holding up to four long-polls.
MAX_CONNECTIONS = 4096
_SWEEP_EVERY_S = 10.0
# On stop, how long held polls get to be answered before the process exits.
_STOP_GRACE_S = 1.0


def version_of(resources: list[dict]) -> str:
    canonical = json.dumps(resources, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


class SourceError(Exception):
    pass


def parse_resources(data: bytes) -> list[dict]:
    """File bytes -> the resource list; SourceError says why not."""
    try:
        doc = load.parse_text(data)
    except load.ConfigError as exc:
        raise SourceError("; ".join(m for _, m in exc.errors)) from None
    if doc is None:
        return []  # an empty file
    if not isinstance(doc, list):
        raise SourceError(f"must be a list of resource objects, got {type(doc).__name__}")
    for i, item in enumerate(doc):
        if not isinstance(item, dict):
            raise SourceError(f"[{i}] must be an object, got {type(item).__name__}")
    try:
        version_of(doc)
    except (TypeError, ValueError) as exc:
        raise SourceError(f"cannot be represented as JSON: {exc}") from None
    return doc


RECHECK_WINDOW_S = 2.0


class FileSource:
    """One type's file, re-read when its mtime, size or inode changes."""

    def __init__(self, kind: str, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.kind, self.path, self.clock = kind, path, clock
        self.resources: list[dict] = []
        self.version = ""
        self.changed_at: float | None = None
        self.error: str | None = None
        self.error_at: float | None = None
        # Replaced on every change; waiters hold the one current at their version.
        self.changed = asyncio.Event()
        self._signature: Any = object()  # never equal to a stat result: the first poll reads

    def _stat(self) -> Any:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return ("error", str(exc))
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _recently_modified(self, signature: Any) -> bool:
        """Within RECHECK_WINDOW_S of its mtime a file is read on every poll.

        Where timestamps are coarse, a same-size rewrite in the same tick
        leaves mtime, size and inode unchanged; the content hash still tells.
        """
        return (isinstance(signature, tuple) and signature[0] != "error"
                and self.clock() - signature[0] / 1e9 < RECHECK_WINDOW_S)

    def _read(self, signature: Any) -> list[dict]:
        if signature is None:
            return []
        if signature[0] == "error":
            raise SourceError(f"cannot stat: {signature[1]}")
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise SourceError(f"cannot read: {exc.strerror or exc}") from None
        return parse_resources(data)

    def poll(self) -> bool:
        """Re-read if the file changed; True when the version changed."""
        signature = self._stat()
        if signature == self._signature and not self._recently_modified(signature):
            return False
        self._signature = signature
        try:
            resources = self._read(signature)
        except SourceError as exc:
            self.error, self.error_at = str(exc), self.clock()
            log.error("resource file rejected; still serving the previous version", extra={"fields": {
                "type": self.kind, "file": str(self.path), "version": self.version or None, "error": self.error}})
            return False
        if self.error is not None:
            log.info("resource file readable again", extra={"fields": {"type": self.kind, "file": str(self.path)}})
        self.error = self.error_at = None
        version = version_of(resources)
        if version == self.version:
            log.debug("resource file rewritten, content unchanged", extra={"fields": {
                "type": self.kind, "version": version}})
            return False
        previous, self.resources, self.version, self.changed_at = self.version, resources, version, self.clock()
        log.info("resources changed", extra={"fields": {
            "type": self.kind, "version": version, "previous": previous or None, "resources": len(resources)}})
        event, self.changed = self.changed, asyncio.Event()
        event.set()
        return True

    def status(self) -> dict:
        return {"version": self.version, "resources": len(self.resources), "file": str(self.path),
                "error": self.error, "error_at": self.error_at, "changed_at": self.changed_at}


# --- per-node bookkeeping (pure: no I/O, clock passed in) -----------------------------------------


@dataclass
class TypeRecord:
    sent: OrderedDict[str, str] = field(default_factory=OrderedDict)  # nonce -> version, oldest first
    last_sent: str | None = None
    acked: str | None = None
    nacked: dict | None = None  # {version, error, at}
    last_request: float | None = None
    polling: int = 0

    def status(self) -> dict:
        return {"sent": self.last_sent, "acked": self.acked, "nacked": self.nacked,
                "last_request": self.last_request, "polling": self.polling > 0}


@dataclass
class NodeRecord:
    last_seen: float
    types: dict[str, TypeRecord] = field(default_factory=dict)

    def busy(self) -> bool:
        return any(r.polling for r in self.types.values())


class Nodes:
    def __init__(self, ttl: float = NODE_TTL_S, max_nodes: int = MAX_NODES) -> None:
        self.ttl, self.max_nodes = ttl, max_nodes
        self.nodes: OrderedDict[str, NodeRecord] = OrderedDict()  # least recently seen first

    def observe(self, req: protocol.DiscoveryRequest, now: float) -> tuple[TypeRecord, str]:
        """Record a request; returns its type record and the version the client has seen."""
        node = self.nodes.get(req.node_id)
        if node is None:
            node = self.nodes[req.node_id] = NodeRecord(now)
            self._evict_over_limit()
        node.last_seen = now
        self.nodes.move_to_end(req.node_id)
        record = node.types.setdefault(req.type, TypeRecord())
        record.last_request = now
        answered = record.sent.get(req.response_nonce) if req.response_nonce else None
        if req.is_nack:
            record.nacked = {"version": answered, "error": (req.error or "")[:MAX_ERROR_CHARS], "at": now}
            # An unknown nonce (say, from before a restart): all we know is what it runs.
            return record, answered if answered is not None else req.version_info
        if req.version_info:
            record.acked = req.version_info
        return record, req.version_info

    def sent(self, record: TypeRecord, nonce: str, version: str) -> None:
        record.sent[nonce] = version
        record.last_sent = version
        while len(record.sent) > NONCE_HISTORY:
            record.sent.popitem(last=False)

    def sweep(self, now: float) -> int:
        stale = [n for n, rec in self.nodes.items() if now - rec.last_seen > self.ttl and not rec.busy()]
        for name in stale:
            del self.nodes[name]
        return len(stale)

    def _evict_over_limit(self) -> None:
        while len(self.nodes) > self.max_nodes:
            victim = next((n for n, rec in self.nodes.items() if not rec.busy()), None)
            if victim is None:
                return
            del self.nodes[victim]

    def status(self) -> dict:
        return {name: {"last_seen": rec.last_seen, "types": {t: r.status() for t, r in rec.types.items()}}
                for name, rec in self.nodes.items()}


# --- the server ---------------------------------------------------------------------------------


class ControlServer:
    def __init__(self, directory: Path, *, max_wait: float, poll_interval: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.max_wait, self.poll_interval, self.clock = max_wait, poll_interval, clock
        self.sources = {t: FileSource(t, directory / FILES[t], clock) for t in protocol.TYPES}
        self.nodes = Nodes()
        self.stopping = False
        self.started_at = clock()
        self._held = 0

    @property
    def held_polls(self) -> int:
        return self._held

    def load(self) -> list[str]:
        """The first read of every file; the problems that keep the server from starting."""
        for source in self.sources.values():
            source.poll()
        return [f"{s.path}: {s.error}" for s in self.sources.values() if s.error is not None]

    def routes(self) -> dict:
        routes: dict[str, dict] = {"/status": {"GET": self.handle_status}, "/live": {"GET": self.handle_live}}
        for kind in protocol.TYPES:
            routes[protocol.DISCOVERY_PATH.format(kind)] = {"POST": self._discovery_handler(kind)}
        return routes

    async def watch(self) -> None:
        next_sweep = self.clock() + _SWEEP_EVERY_S
        while True:
            await asyncio.sleep(self.poll_interval)
            for source in self.sources.values():
                try:
                    source.poll()
                except Exception:  # one bad poll must not stop the watching
                    log.exception("polling a resource file failed", extra={"fields": {"file": str(source.path)}})
            now = self.clock()
            if now >= next_sweep:
                next_sweep = now + _SWEEP_EVERY_S
                forgotten = self.nodes.sweep(now)
                if forgotten:
                    log.info("forgot idle nodes", extra={"fields": {"count": forgotten}})

    def stop(self) -> None:
        """Answer every held poll (304 unless its type changed) and every later request."""
        self.stopping = True
        for source in self.sources.values():
            source.changed.set()  # left set: a later waiter returns at once

    async def wait_idle(self, timeout: float = _STOP_GRACE_S) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while self._held and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)  # the answered polls' writes happen right after their handlers return

    # --- handlers

    def _discovery_handler(self, kind: str):
        async def handler(request: Request) -> Response:
            return await self.discovery(kind, request)
        return handler

    async def discovery(self, kind: str, request: Request) -> Response:
        try:
            doc = json.loads(request.body)
        except (ValueError, UnicodeDecodeError) as exc:
            return text_response(400, f"invalid JSON: {exc}")
        try:
            req = protocol.DiscoveryRequest.from_json(kind, doc)
        except protocol.ProtocolError as exc:
            return text_response(400, str(exc))
        if len(req.node_id) > MAX_NODE_ID_CHARS:
            return text_response(400, f"node.id is longer than {MAX_NODE_ID_CHARS} characters")
        record, seen = self.nodes.observe(req, self.clock())
        source = self.sources[kind]
        fields = {"node": req.node_id, "type": kind, "version": seen or None, "nonce": req.response_nonce or None}
        if req.is_nack:
            log.warning("NACK", extra={"fields": {**fields, "error": record.nacked["error"]}})
        elif req.response_nonce:
            log.debug("ACK", extra={"fields": fields})
        if seen != source.version:
            return self._respond(record, source)
        if not self.stopping:
            event = source.changed
            record.polling += 1
            self._held += 1
            try:
                await asyncio.wait_for(event.wait(), self.max_wait)
            except asyncio.TimeoutError:
                pass
            finally:
                record.polling -= 1
                self._held -= 1
            if seen != source.version:
                return self._respond(record, source)
        response = Response(304)
        if self.stopping:
            response.headers.append(("Connection", "close"))
        return response

    def _respond(self, record: TypeRecord, source: FileSource) -> Response:
        answer = protocol.DiscoveryResponse(source.kind, source.version, source.resources)
        self.nodes.sent(record, answer.nonce, answer.version_info)
        response = Response(200, json.dumps(answer.to_json(), separators=(",", ":")).encode(), "application/json")
        if self.stopping:
            response.headers.append(("Connection", "close"))
        return response

    async def handle_status(self, request: Request) -> Response:
        return json_response(200, {"started_at": self.started_at, "max_wait_s": self.max_wait,
                                   "types": {t: s.status() for t, s in self.sources.items()},
                                   "nodes": self.nodes.status()})

    async def handle_live(self, request: Request) -> Response:
        return text_response(200, "live")


async def serve(directory: Path, address: str, port: int, *, max_wait: float, poll_interval: float) -> int:
    """Run until SIGTERM/SIGINT; the process's exit code."""
    control = ControlServer(directory, max_wait=max_wait, poll_interval=poll_interval)
    problems = control.load()
    if problems:
        for problem in problems:
            log.error("cannot start: a resource file is invalid", extra={"fields": {"error": problem}})
        return 1
    # Each held poll is a descriptor: the usual soft limit of 1024 would cap the nodes served.
    raise_fd_limit()
    admin = AdminServer(control.routes(), max_connections=MAX_CONNECTIONS)
    try:
        await admin.start(address, port)
    except OSError as exc:
        log.error("cannot listen", extra={"fields": {"address": address, "port": port,
                                                      "error": exc.strerror or str(exc)}})
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = loop.create_task(control.watch())
    log.info("control server listening", extra={"fields": {
        "address": address, "port": port, "dir": str(directory), "max_wait_s": max_wait,
        **{t: s.version for t, s in control.sources.items()}}})
    try:
        await stop.wait()
    finally:
        log.info("stopping", extra={"fields": {"held_polls": control.held_polls}})
        admin.close()
        control.stop()
        watcher.cancel()
        await control.wait_idle()
    return 0
