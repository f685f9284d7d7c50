"""Process limits the proxy and the control server raise at start."""
from __future__ import annotations

import resource
from pathlib import Path


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE and return the new soft limit.

    The proxy holds two descriptors per relayed connection, the control
    server one per held poll.

    The soft limit goes to the hard one; with CAP_SYS_RESOURCE the hard one
    is first raised to the kernel's fs.nr_open (capped at 1M), so 10,000+
    connections do not end in EMFILE on a node whose default is low.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        nr_open = hard
    wanted = max(hard, min(nr_open, 1 << 20))
    for target in (wanted, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            continue
    return soft
