"""host:port text <-> (host, port) tuples, IPv6 in brackets."""
from __future__ import annotations

import ipaddress
import re

_HOST_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                      r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def format_addr(addr: tuple | None) -> str:
    if not addr:
        return ""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(text: str) -> tuple[str, int]:
    """'10.0.0.1:80' / '[::1]:80' / 'svc.local:80' -> (host, port). Raises ValueError."""
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"'{text}' is not host:port (IPv6 is written [addr]:port)")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"'{host}' is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"'{text}' is not host:port")
        if ":" in host:
            raise ValueError(f"'{text}': write IPv6 endpoints as [addr]:port")
        if not _HOST_RE.match(host):
            raise ValueError(f"'{host}' is not an IP address or host name")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 1..65535, got '{port_text}'")
    return host, int(port_text)
