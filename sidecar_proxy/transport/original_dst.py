"""Where a redirected connection was going, and whether that is us.

iptables REDIRECT rewrites the destination to the proxy's listener; the
address the app asked for stays in the conntrack entry, which the kernel
hands back through ``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` (IPv4) or
``getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)`` (IPv6). Both return a raw
``sockaddr_in`` / ``sockaddr_in6``.
"""
from __future__ import annotations

import errno
import ipaddress
import socket
import struct

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)

_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # family (host order, skipped), port, addr
_SOCKADDR_IN6 = struct.Struct("!2xHI16sI")  # family, port, flowinfo, addr, scope


def decode_sockaddr_in(raw: bytes) -> tuple[str, int]:
    port, addr = _SOCKADDR_IN.unpack(raw[: _SOCKADDR_IN.size])
    return socket.inet_ntop(socket.AF_INET, addr), port


def decode_sockaddr_in6(raw: bytes) -> tuple[str, int]:
    port, _flow, addr, _scope = _SOCKADDR_IN6.unpack(raw[: _SOCKADDR_IN6.size])
    return socket.inet_ntop(socket.AF_INET6, addr), port


def original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """The pre-NAT destination, or None if the connection was not NATed.

    ENOENT means conntrack holds no entry for the socket (no NAT happened, or
    conntrack is not loaded); the caller then falls back to the local address
    and loop detection refuses a connection made straight to the listener.
    """
    try:
        if sock.family == socket.AF_INET6:
            return decode_sockaddr_in6(sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6.size))
        return decode_sockaddr_in(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size))
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
            return None
        raise


def is_local_address(host: str) -> bool:
    """True if ``host`` is an address of this network namespace.

    Binding a throwaway socket is exact (it asks the kernel's own routing
    table) and costs two syscalls; it only runs when a destination port is one
    of our listener ports, which normal traffic never is.
    """
    ip = ipaddress.ip_address(host)
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True


def is_own_listener(dst: tuple[str, int], listener_ports: frozenset[int] | set[int]) -> bool:
    """Would relaying to ``dst`` connect back to one of our listeners?"""
    return dst[1] in listener_ports and is_local_address(dst[0])
