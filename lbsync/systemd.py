"""sd_notify without libsystemd: a datagram to ``$NOTIFY_SOCKET`` is the whole protocol.

Under ``Type=notify`` systemd waits for ``READY=1`` before it calls the unit started;
with ``WatchdogSec=`` it expects ``WATCHDOG=1`` at least that often and restarts the
service otherwise. Outside systemd (no ``$NOTIFY_SOCKET``) every call is a cheap no-op
returning False, so the daemon calls these unconditionally.

The daemon sends: ``ready()`` after the first successful sync, ``watchdog()`` from the
main loop every ``watchdog_interval()`` seconds, ``reloading()`` / ``ready()`` around a
SIGHUP, ``stopping()`` on SIGTERM, and ``status(text)`` for ``systemctl status``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("lbsync.systemd")


def _address(environ: Mapping[str, str]) -> str | None:
    path = environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]  # abstract namespace
    if path.startswith("/"):
        return path
    return None  # unset, or a kind we do not speak (vsock:…)


def notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``"READY=1"``, newline-separated assignments); False if not sent."""
    address = _address(os.environ if environ is None else environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("systemd.notify_failed", state=state.split("\n", 1)[0], error=str(exc))
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """The service is up (first sync done); also ends a ``reloading()``."""
    return notify("READY=1" + (f"\nSTATUS={_line(status_text)}" if status_text else ""))


def reloading() -> bool:
    """A SIGHUP reload started; send ``ready()`` when it is done."""
    return notify(
        f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    )


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog() -> bool:
    """Keep-alive for ``WatchdogSec=``; send it from the main loop, not from a side thread."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """One line for ``systemctl status`` (e.g. ``revision 1234, 3 services, 12 up``)."""
    return notify(f"STATUS={_line(text)}")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``watchdog()`` calls (half of ``WatchdogSec=``), or None if off.

    Only for us: ``$WATCHDOG_PID``, when set, must be our pid (a child that inherited the
    environment must not ping on its parent's behalf).
    """
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None


def _line(text: str) -> str:
    return " ".join(text.split())
