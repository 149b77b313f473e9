"""Loopback helpers shared by the integration harnesses."""

from __future__ import annotations

import collections
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


_recent: collections.deque[int] = collections.deque(maxlen=256)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a listener a test starts next.

    Chosen *below* the kernel's ephemeral range: a port from bind(0) is an ephemeral one,
    and between this call and the listener's bind any outgoing connection (the tests make
    thousands) may take it as its source port; HAProxy then fails to start its listeners.
    """
    low, _high = _ephemeral_range()
    candidates = range(max(1024, low - 12000), low)
    for _ in range(200):
        port = random.choice(candidates)
        if port in _recent:  # handed out but maybe not bound yet (etcd's two ports)
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _recent.append(port)
        return port
    raise AssertionError(f"no free port in {candidates.start}-{candidates.stop - 1}")


def wait_for(
    probe: Callable[[], T | None],
    *,
    timeout: float = 20.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after ``timeout``.

    Tests wait for states, never for fixed times: the bound is generous because the
    machines are shared, and a healthy run returns as soon as the state is reached.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
