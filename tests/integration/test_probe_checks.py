"""One check against real loopback backends: HTTP status, body, method, Host; TCP connect."""

from __future__ import annotations

import asyncio

import pytest

from lbsync.config import CheckSettings
from lbsync.model import Instance
from lbsync.probe.checks import CheckResult, run_check
from lbsync.probe.curl import CurlLoop
from tests.harness.backends import Backend
from tests.harness.net import free_port

pytestmark = pytest.mark.integration


def check(port: int, **settings: object) -> CheckResult:
    async def one() -> CheckResult:
        instance = Instance(id="i", host="127.0.0.1", port=port)
        curl = CurlLoop()
        try:
            return await run_check(curl, instance, CheckSettings.model_validate(settings))
        finally:
            curl.close()

    return asyncio.run(one())


def test_http_checks(backends: list[Backend]) -> None:
    b1 = backends[0]
    assert check(b1.port) == CheckResult(True)
    assert check(b1.port, body_contains="b1", host="web.example") == CheckResult(True)
    assert check(b1.port, body_contains="b2") == CheckResult(False, "HTTP 200 on /: body mismatch")
    assert check(b1.port, status_min=201, path="/x?y=1") == CheckResult(False, "HTTP 200 on /x?y=1")
    # The harness backend has no do_HEAD: a 501 proves the method went out as HEAD.
    assert check(b1.port, method="HEAD") == CheckResult(False, "HTTP 501 on /")
    assert check(b1.port, method="HEAD", status_max=599) == CheckResult(True)
    b1.fail("error")
    assert check(b1.port, path="/healthz") == CheckResult(False, "HTTP 500 on /healthz")
    b1.fail("hang")
    assert check(b1.port, timeout="0.2s") == CheckResult(False, "timeout after 0.2s")
    b1.fail("reset")
    result = check(b1.port)
    assert not result.ok
    assert result.reason
    refused = check(free_port())
    assert not refused.ok
    assert "refused" in refused.reason.lower()


def test_tcp_checks(backends: list[Backend]) -> None:
    assert check(backends[0].port, type="tcp") == CheckResult(True)
    closed = check(free_port(), type="tcp")
    assert not closed.ok
    assert "refused" in closed.reason.lower()
