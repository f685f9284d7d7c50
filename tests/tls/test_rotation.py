"""Rotation without restart: files rewritten under a running watcher, half-written sets, expiry."""
import asyncio
import datetime as dt
import os
import time

import pytest

from sidecar_proxy.tls import certs
from sidecar_proxy.tls.rotation import IdentitySource

from . import pki
from .harness import WAIT_S, KeptConnection, TLSServer, tls_client

TD = "rot.test"
WORKLOAD = f"spiffe://{TD}/ns/default/sa/web"


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def ca():
    # Made two days ago, so certificates can be issued in the past too.
    return certs.make_ca(TD, days=30, now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2))


def _write(d, workload, bundle):
    certs.write_workload(d, workload, bundle)


def _source(d, **kw) -> IdentitySource:
    return IdentitySource(d / certs.CERT_FILE, d / certs.KEY_FILE, d / certs.BUNDLE_FILE, **kw)


def _client(ca, bundle_certs=None):
    leaf = certs.issue_workload(ca, f"spiffe://{TD}/ns/default/sa/client")
    cert = pki.Cert(leaf.cert, leaf.key, leaf.chain)
    return pki.client_ssl_context(certs.cert_pem(bundle_certs or [ca.cert]), cert)


def _serial_of_new_handshake(port, ctx) -> int:
    from cryptography import x509
    conn = KeptConnection(port, ctx)
    try:
        return x509.load_der_x509_certificate(conn.peer_cert()).serial_number
    finally:
        conn.close()


def test_rotation_under_a_running_watcher(tmp_path, ca):
    first = certs.issue_workload(ca, WORKLOAD, ttl=dt.timedelta(hours=1))
    _write(tmp_path, first, [ca.cert])
    source = _source(tmp_path, poll_interval=0.1)
    source.load()
    client_ctx = _client(ca)

    def current_ctx():
        c = source.current()
        return c.server if c is not None else None

    with TLSServer(current_ctx, info=lambda: str(source.generation).encode()) as srv:
        watcher = srv.call(lambda: srv.loop.create_task(source.watch()))
        try:
            kept = KeptConnection(srv.port, client_ctx)
            assert kept.roundtrip(b"who").endswith(b" 1")
            assert _serial_of_new_handshake(srv.port, client_ctx) == first.cert.serial_number

            second = certs.issue_workload(ca, WORKLOAD, ttl=dt.timedelta(hours=2))
            rotated_at = time.monotonic()
            _write(tmp_path, second, [ca.cert])
            deadline = rotated_at + WAIT_S
            while _serial_of_new_handshake(srv.port, client_ctx) != second.cert.serial_number:
                assert time.monotonic() < deadline, "new handshakes never saw the new certificate"
                time.sleep(0.05)
            assert time.monotonic() - rotated_at < 2.0  # "within seconds": one poll interval, plus a handshake
            assert source.generation == 2 and source.reloads == 1
            assert source.not_after == second.cert.not_valid_after_utc.timestamp()

            # The connection made before the rotation still works, on its old certificate.
            assert kept.roundtrip(b"still here") == b"still here"
            from cryptography import x509
            assert x509.load_der_x509_certificate(kept.peer_cert()).serial_number == first.cert.serial_number
            kept.close()
        finally:
            srv.call(watcher.cancel)


def test_half_written_or_mismatched_files_keep_the_old_identity(tmp_path, ca):
    first = certs.issue_workload(ca, WORKLOAD)
    _write(tmp_path, first, [ca.cert])
    source = _source(tmp_path)
    source.load()
    old = source.current()
    second = certs.issue_workload(ca, WORKLOAD)

    # 1. The new certificate, the old key (a writer that has not reached the key yet).
    (tmp_path / certs.CERT_FILE).write_bytes(certs.cert_pem(second.full_chain))
    assert source.poll() is False
    assert source.current() is old and source.rejected == {"key_mismatch": 1}
    assert source.poll() is False and source.rejected == {"key_mismatch": 1}  # counted once per content

    # 2. The new key, half of the new certificate (a non-atomic writer, mid-write).
    (tmp_path / certs.KEY_FILE).write_bytes(certs.key_pem(second.key))
    pem = certs.cert_pem(second.full_chain)
    (tmp_path / certs.CERT_FILE).write_bytes(pem[: len(pem) // 2])
    assert source.poll() is False
    assert source.current() is old and source.rejected["unreadable"] == 1

    # 3. An empty key file.
    (tmp_path / certs.CERT_FILE).write_bytes(pem)
    (tmp_path / certs.KEY_FILE).write_bytes(b"")
    assert source.poll() is False and source.current() is old and source.rejected["unreadable"] == 2

    # 4. A certificate from a CA the bundle does not have.
    stranger = certs.issue_workload(certs.make_ca(TD), WORKLOAD)
    (tmp_path / certs.CERT_FILE).write_bytes(certs.cert_pem(stranger.full_chain))
    (tmp_path / certs.KEY_FILE).write_bytes(certs.key_pem(stranger.key))
    assert source.poll() is False and source.current() is old and source.rejected["untrusted"] == 1

    # 5. The files are gone for a moment.
    os.unlink(tmp_path / certs.CERT_FILE)
    assert source.poll() is False and source.current() is old and source.rejected["unreadable"] == 3

    # 6. Finally complete and consistent: applied.
    _write(tmp_path, second, [ca.cert])
    assert source.poll() is True
    live = source.current()
    assert live is not old and live.generation == 2 and live.identity.leaf.serial_number == second.cert.serial_number


def test_unchanged_content_is_not_reloaded(tmp_path, ca):
    first = certs.issue_workload(ca, WORKLOAD)
    _write(tmp_path, first, [ca.cert])
    source = _source(tmp_path)
    source.load()
    assert source.poll() is False
    _write(tmp_path, first, [ca.cert])  # same bytes, new inodes and mtimes
    assert source.poll() is False
    assert source.generation == 1 and source.reloads == 0 and source.rejected == {}


def test_expired_certificate_is_never_handed_out(tmp_path, ca):
    clock = FakeClock()
    first = certs.issue_workload(ca, WORKLOAD, ttl=dt.timedelta(hours=1))
    _write(tmp_path, first, [ca.cert])
    source = _source(tmp_path, clock=clock)
    source.load()
    assert source.current() is not None

    clock.now = first.cert.not_valid_after_utc.timestamp() + 1
    assert source.current() is None
    assert source.current() is None
    assert source.expired_refusals == 2
    assert source.identity is not None  # still known (for status), just not usable
    with TLSServer(lambda: (c := source.current()) and c.server) as srv:
        tls_client(srv.port, _client(ca))
        assert srv.next_outcome().reason == "no_local_identity"

    # A replacement valid at the (fake) time is picked up; current() serves again.
    fresh = certs.issue_workload(ca, WORKLOAD, ttl=dt.timedelta(hours=1),
                                 now=dt.datetime.fromtimestamp(clock.now, dt.timezone.utc))
    _write(tmp_path, fresh, [ca.cert])
    assert source.poll() is True
    assert source.current().identity.leaf.serial_number == fresh.cert.serial_number


def test_an_expired_replacement_is_refused(tmp_path, ca):
    clock = FakeClock()
    first = certs.issue_workload(ca, WORKLOAD)
    _write(tmp_path, first, [ca.cert])
    source = _source(tmp_path, clock=clock)
    source.load()
    stale = certs.issue_workload(ca, WORKLOAD, ttl=dt.timedelta(minutes=1),
                                 now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1))
    _write(tmp_path, stale, [ca.cert])
    assert source.poll() is False
    assert source.rejected == {"expired": 1} and source.current().identity.leaf.serial_number == first.cert.serial_number


def test_not_yet_valid_replacement_is_retried_when_it_becomes_valid(tmp_path, ca):
    clock = FakeClock()
    first = certs.issue_workload(ca, WORKLOAD)
    _write(tmp_path, first, [ca.cert])
    source = _source(tmp_path, clock=clock)
    source.load()
    early = certs.issue_workload(ca, WORKLOAD, backdate=dt.timedelta(0),
                                 now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=10))
    _write(tmp_path, early, [ca.cert])
    assert source.poll() is False and source.rejected == {"not_yet_valid": 1}
    assert source.poll() is False and source.rejected == {"not_yet_valid": 1}  # not re-checked every poll
    clock.now = early.cert.not_valid_before_utc.timestamp() + 1  # files untouched, time passed
    assert source.poll() is True
    assert source.current().identity.leaf.serial_number == early.cert.serial_number


def test_trust_bundle_change_alone_rotates(tmp_path, ca):
    """A new CA added to the bundle: new handshakes trust its clients, on fresh contexts."""
    first = certs.issue_workload(ca, WORKLOAD)
    _write(tmp_path, first, [ca.cert])
    source = _source(tmp_path)
    source.load()
    new_ca = certs.make_ca(TD)
    with TLSServer(lambda: source.current().server) as srv:
        tls_client(srv.port, _client(new_ca, [ca.cert]))
        assert srv.next_outcome().reason == "unknown_ca"
        old_server_ctx = source.current().server
        _write(tmp_path, first, [ca.cert, new_ca.cert])
        assert source.poll() is True
        assert source.current().server is not old_server_ctx  # a new SSL_CTX: no session of the old bundle
        assert source.bundle_not_after == min(ca.cert.not_valid_after_utc, new_ca.cert.not_valid_after_utc).timestamp()
        assert tls_client(srv.port, _client(new_ca, [ca.cert])) == b"ping"
        assert srv.next_outcome().reason is None


def test_load_without_files_then_watch_finds_them(tmp_path, ca):
    source = _source(tmp_path)
    from sidecar_proxy.tls.identity import IdentityError
    with pytest.raises(IdentityError) as info:
        source.load()
    assert info.value.reason == "unreadable"
    assert source.current() is None and source.not_after is None
    _write(tmp_path, certs.issue_workload(ca, WORKLOAD), [ca.cert])

    async def main():
        source.poll_interval = 0.05
        task = asyncio.get_running_loop().create_task(source.watch())
        try:
            for _ in range(100):
                if source.current() is not None:
                    return True
                await asyncio.sleep(0.02)
            return False
        finally:
            task.cancel()

    import uvloop
    assert uvloop.run(main())
    assert source.generation == 1
