"""One active check of one instance: an HTTP request (libcurl, through pycurl) or a TCP connect.

libcurl, through pycurl's multi interface on the prober's own loop (``curl``): it connects,
sends the request and parses the response in C. On loopback it spent 120-160 µs of CPU per
check against aiohttp's 300-320 µs (4,000 GETs, 200 in flight, a new connection each, on
uvloop; docs/benchmarks.md "Prober"), which is what lets one prober check 10,000 instances
every 5 s in half a core. Every check opens a new connection and closes it (as HAProxy's
checks do: a backend that stopped accepting connections must not look healthy through an
old one). A check never raises: every failure is a ``CheckResult`` whose ``reason`` says
why in a few words (it ends up in etcd).
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass

import pycurl

from lbsync.config import CheckSettings
from lbsync.model import Instance
from lbsync.probe.curl import TIMED_OUT, WRITE_STOPPED, CurlLoop, Outcome

MAX_BODY = 64 * 1024  # body_contains looks at this much of the body
USER_AGENT = "lbsync-probe"
_UNSAFE = re.compile(r"[^A-Za-z0-9 _.:/@=+,%~()\[\]<>!?*&^$|-]")
_HEADER_VALUE = re.compile(r"[\x21-\x7e]+")  # a Host header: no spaces, no control characters


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    reason: str = ""


def safe_reason(text: str) -> str:
    """A reason the catalog's schema accepts (``values.SAFE_TEXT``): odd characters become _."""
    return _UNSAFE.sub("_", text)[:200]


async def run_check(curl: CurlLoop, instance: Instance, check: CheckSettings) -> CheckResult:
    try:
        async with asyncio.timeout(check.timeout):
            if check.type == "tcp":
                return await _tcp(instance)
            return await _http(curl, instance, check)
    except TimeoutError:
        return _timed_out(check)
    except OSError as exc:  # "Connection refused" and the like
        return CheckResult(False, safe_reason(_os_reason(exc.errno, type(exc).__name__)))
    except pycurl.error as exc:  # libcurl refused the handle itself (setopt, add_handle)
        return CheckResult(False, safe_reason(f"curl: {exc}"))


def _timed_out(check: CheckSettings) -> CheckResult:
    return CheckResult(False, f"timeout after {check.timeout:g}s")


def _os_reason(errno: int | None, otherwise: str) -> str:
    return os.strerror(errno) if errno else otherwise


async def _tcp(instance: Instance) -> CheckResult:
    _reader, writer = await asyncio.open_connection(instance.host, instance.port)
    writer.close()
    await writer.wait_closed()
    return CheckResult(True)


async def _http(curl: CurlLoop, instance: Instance, check: CheckSettings) -> CheckResult:
    if check.host is not None and not _HEADER_VALUE.fullmatch(check.host):
        return CheckResult(False, safe_reason(f"unusable Host header {check.host!r}"))
    body = _Body(check.body_contains is not None and check.method == "GET")
    outcome = await curl.perform(_request(instance, check, body))
    if outcome.error == TIMED_OUT:
        return _timed_out(check)
    if outcome.error not in (0, WRITE_STOPPED) or outcome.status == 0:
        reason = _os_reason(outcome.os_errno, outcome.message or f"curl error {outcome.error}")
        return CheckResult(False, safe_reason(reason))
    return _judge(outcome, check, bytes(body.data))


def _judge(outcome: Outcome, check: CheckSettings, body: bytes) -> CheckResult:
    where = safe_reason(check.path)
    if not check.status_min <= outcome.status <= check.status_max:
        return CheckResult(False, f"HTTP {outcome.status} on {where}")
    needle = check.body_contains
    if needle is not None and check.method == "GET" and needle.encode() not in body:
        return CheckResult(False, f"HTTP {outcome.status} on {where}: body mismatch")
    return CheckResult(True)


class _Body:
    """libcurl's write callback: keeps the first ``MAX_BODY`` bytes when the body is
    looked at, and stops the transfer once it has them (or at once when it is not: the
    status line is all a check needs then)."""

    def __init__(self, wanted: bool) -> None:
        self.wanted = wanted
        self.data = bytearray()

    def write(self, chunk: bytes) -> int | None:
        if not self.wanted:
            return 0  # any count but len(chunk) stops the transfer (WRITE_STOPPED)
        self.data += chunk[: MAX_BODY - len(self.data)]
        return 0 if len(self.data) >= MAX_BODY else None


def _request(instance: Instance, check: CheckSettings, body: _Body) -> pycurl.Curl:
    """A fresh easy handle for one check: HTTP only, no proxy (not even one from the
    environment), no redirects, a new connection closed afterwards, libcurl's own
    timeout as a second bound besides ``run_check``'s."""
    handle = pycurl.Curl()
    handle.setopt(pycurl.URL, f"http://{instance.address}{check.path}")
    handle.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP)
    handle.setopt(pycurl.PROXY, "")
    handle.setopt(pycurl.FRESH_CONNECT, 1)
    handle.setopt(pycurl.FORBID_REUSE, 1)
    handle.setopt(pycurl.NOSIGNAL, 1)
    handle.setopt(pycurl.TIMEOUT_MS, max(1, int(check.timeout * 1000)))
    handle.setopt(pycurl.USERAGENT, USER_AGENT)
    if check.method == "HEAD":
        handle.setopt(pycurl.NOBODY, 1)
    if check.host is not None:
        handle.setopt(pycurl.HTTPHEADER, [f"Host: {check.host}"])
    handle.setopt(pycurl.WRITEFUNCTION, body.write)
    return handle
