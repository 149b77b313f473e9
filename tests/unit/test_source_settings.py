"""The etcd source's start-up checks: bad endpoints and unreadable files fail at once, as
ConfigError naming the setting, instead of inside the reconnect loop."""

from __future__ import annotations

from pathlib import Path

import pytest

from lbsync.config import EtcdSettings
from lbsync.errors import ConfigError, LeaseExpired, RevisionCompacted, SourceError
from lbsync.source import EtcdSource, EtcdWriter


def settings(**values: object) -> EtcdSettings:
    return EtcdSettings.model_validate({"endpoints": ["https://127.0.0.1:2379"], **values})


def test_an_unreadable_ca_file_is_a_config_error_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"etcd\.ca_file: cannot read .*missing\.crt"):
        EtcdSource(settings(ca_file=tmp_path / "missing.crt"))


def test_an_unreadable_password_file_is_a_config_error_for_the_writer_too(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match=r"etcd\.password_file"):
        EtcdWriter(settings(user="lbsync", password_file=tmp_path / "nope"))


def test_plain_http_endpoints_with_tls_files_are_refused(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("not checked here")
    mixed = settings(ca_file=ca, endpoints=["https://10.0.0.1:2379", "http://10.0.0.2:2379"])
    with pytest.raises(ConfigError, match=r"http://10\.0\.0\.2:2379 is plain HTTP"):
        EtcdSource(mixed)


def test_source_errors_carry_their_endpoint() -> None:
    compacted = RevisionCompacted(7, 9, endpoint="http://e:2379")
    assert str(compacted).startswith("etcd http://e:2379: revision 7 was compacted")
    assert compacted.context() == {
        "endpoint": "http://e:2379",
        "revision": 7,
        "compact_revision": 9,
    }
    expired = LeaseExpired(0xABC, endpoint="http://e:2379")
    assert isinstance(expired, SourceError)
    assert str(expired) == "etcd http://e:2379: lease abc has expired"
    assert expired.context() == {"endpoint": "http://e:2379", "lease": "abc"}


def test_grpc_waits_on_a_stream_are_not_sliced_into_tenths_of_a_second() -> None:
    """An idle watch must not wake its reader thread ten times a second (bench idle)."""
    import grpc._common

    from lbsync.source import client

    assert grpc._common.MAXIMUM_WAIT_TIMEOUT == client._GRPC_WAIT_SLICE >= 10.0
