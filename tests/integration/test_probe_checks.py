"""One check against real loopback backends: HTTP status, body, method, Host; TCP connect."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from lbsync.config import CheckSettings
from lbsync.model import Instance
from lbsync.probe.checks import CheckResult, run_check
from tests.harness.backends import Backend
from tests.harness.net import free_port

pytestmark = pytest.mark.integration


def check(port: int, **settings: object) -> CheckResult:
    async def one() -> CheckResult:
        instance = Instance(id="i", host="127.0.0.1", port=port)
        async with aiohttp.ClientSession() as session:
            return await run_check(session, instance, CheckSettings.model_validate(settings))

    return asyncio.run(one())


def test_http_checks(backends: list[Backend]) -> None:
    b1 = backends[0]
    assert check(b1.port) == CheckResult(True)
    assert check(b1.port, body_contains="b1", host="web.example") == CheckResult(True)
    assert check(b1.port, body_contains="b2") == CheckResult(False, "HTTP 200 on /: body mismatch")
    assert check(b1.port, status_min=201, path="/x?y=1") == CheckResult(False, "HTTP 200 on /x?y=1")
    b1.fail("error")
    assert check(b1.port, path="/healthz") == CheckResult(False, "HTTP 500 on /healthz")
    b1.fail("hang")
    assert check(b1.port, timeout="0.2s") == CheckResult(False, "timeout after 0.2s")
    b1.fail("reset")
    result = check(b1.port)
    assert not result.ok
    assert result.reason


def test_tcp_checks(backends: list[Backend]) -> None:
    assert check(backends[0].port, type="tcp") == CheckResult(True)
    closed = check(free_port(), type="tcp")
    assert not closed.ok
    assert "refused" in closed.reason.lower()
