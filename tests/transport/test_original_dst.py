import socket
import struct

from sidecar_proxy.transport.original_dst import (decode_sockaddr_in, decode_sockaddr_in6, is_local_address,
                                                  is_own_listener, original_dst)


def test_decode_sockaddr_in_as_the_kernel_lays_it_out():
    # struct sockaddr_in: family in host order, port and address in network order, 8 bytes of zero.
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 8080) + socket.inet_aton("10.222.0.2") + bytes(8)
    assert decode_sockaddr_in(raw) == ("10.222.0.2", 8080)


def test_decode_sockaddr_in6_as_the_kernel_lays_it_out():
    raw = (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 443, 0)
           + socket.inet_pton(socket.AF_INET6, "fd00:222::2") + struct.pack("=I", 0))
    assert decode_sockaddr_in6(raw) == ("fd00:222::2", 443)


def test_a_connection_that_was_not_nated_has_no_original_destination():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=2):
            accepted, _ = server.accept()
            with accepted:
                assert original_dst(accepted) is None


def test_own_listener_needs_our_port_and_a_local_address():
    ports = frozenset({15001, 15006})
    assert is_own_listener(("127.0.0.1", 15001), ports)
    assert is_own_listener(("0.0.0.0", 15006), ports)
    assert is_own_listener(("::1", 15001), ports)
    assert not is_own_listener(("127.0.0.1", 8080), ports)
    # 192.0.2.0/24 is TEST-NET-1: never an address of this machine.
    assert not is_own_listener(("192.0.2.10", 15001), ports)
    assert not is_local_address("192.0.2.10")
