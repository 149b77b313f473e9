"""Fixtures shared by the daemon-level unit tests (test_daemon.py, test_reconcile.py)."""

from pathlib import Path

import pytest

from lbsync.testing import FakeDriver, FakeSource


@pytest.fixture
def source() -> FakeSource:
    return FakeSource({"services": {"web": {"instances": {"a": "10.0.0.1:80"}}}})


@pytest.fixture
def driver() -> FakeDriver:
    return FakeDriver()


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out.conf"
