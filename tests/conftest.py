from collections.abc import Iterator

import pytest
import structlog

pytest_plugins = [
    "tests.harness.backends",
    "tests.harness.etcd",
    "tests.harness.haproxy",
    "tests.harness.nginx",
]


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """A test that ran the CLI configured structlog onto its own (now closed) capture stream."""
    yield
    structlog.reset_defaults()
