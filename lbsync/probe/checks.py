"""One active check of one instance: an HTTP request (aiohttp) or a TCP connect.

aiohttp, not httpx: on loopback it spent ~0.29 ms of CPU per check against httpx's ~1.3 ms
(4,000 GETs, 200 at a time, a new connection each), which is what decides whether one
prober can check 10,000 instances every 5 s. A check never raises: every failure is a
``CheckResult`` whose ``reason`` says why in a few words (it ends up in etcd).
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass

import aiohttp

from lbsync.config import CheckSettings
from lbsync.model import Instance

MAX_BODY = 64 * 1024  # body_contains looks at this much of the body
_UNSAFE = re.compile(r"[^A-Za-z0-9 _.:/@=+,%~()\[\]<>!?*&^$|-]")


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    reason: str = ""


def safe_reason(text: str) -> str:
    """A reason the catalog's schema accepts (``values.SAFE_TEXT``): odd characters become _."""
    return _UNSAFE.sub("_", text)[:200]


async def run_check(
    session: aiohttp.ClientSession, instance: Instance, check: CheckSettings
) -> CheckResult:
    try:
        async with asyncio.timeout(check.timeout):
            if check.type == "tcp":
                return await _tcp(instance)
            return await _http(session, instance, check)
    except TimeoutError:
        return CheckResult(False, f"timeout after {check.timeout:g}s")
    except OSError as exc:  # aiohttp's connection errors among them: "Connection refused"
        return CheckResult(False, safe_reason(_os_reason(exc)))
    except aiohttp.ClientError as exc:
        return CheckResult(False, safe_reason(f"{type(exc).__name__}: {exc}"))


def _os_reason(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else type(exc).__name__


async def _tcp(instance: Instance) -> CheckResult:
    _reader, writer = await asyncio.open_connection(instance.host, instance.port)
    writer.close()
    await writer.wait_closed()
    return CheckResult(True)


async def _http(
    session: aiohttp.ClientSession, instance: Instance, check: CheckSettings
) -> CheckResult:
    url = f"http://{instance.address}{check.path}"
    headers = {"Host": check.host} if check.host else None
    async with session.request(
        check.method, url, headers=headers, allow_redirects=False
    ) as response:
        if not check.status_min <= response.status <= check.status_max:
            return CheckResult(False, f"HTTP {response.status} on {safe_reason(check.path)}")
        if check.body_contains is not None and check.method == "GET":
            body = await response.content.read(MAX_BODY)
            if check.body_contains.encode() not in body:
                where = safe_reason(check.path)
                return CheckResult(False, f"HTTP {response.status} on {where}: body mismatch")
        return CheckResult(True)
