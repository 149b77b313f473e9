"""lbsync status: the table and the JSON document, from a catalog given as data."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lbsync import status
from lbsync.config import EtcdSettings
from lbsync.errors import ConfigError
from lbsync.status import DaemonStatus, StatusReport
from lbsync.testing import FakeSource, snapshot_from

CATALOG: dict[str, Any] = {
    "services": {
        "web": {
            "instances": {
                "w1": {"host": "10.0.0.1", "port": 8080, "weight": 3},
                "w2": {"host": "10.0.0.2", "port": 8080},
                "w3": {"host": "2001:db8::3", "port": 8080, "state": "drain"},
                "bad": "10.0.0.9:80; include /etc/passwd",
            },
            "health": {"w2": {"status": "down", "reason": "5xx rate", "by": "monitor"}},
            "probes": {
                "w1": {"lb-1": {"status": "up"}, "lb-2": {"status": "down", "reason": "HTTP 503"}}
            },
        },
        "idle": {"settings": {"balance": "least_conn"}},
    }
}


def report(daemon: DaemonStatus | None = None) -> StatusReport:
    return status.collect(
        EtcdSettings(),
        "127.0.0.1:9274" if daemon else None,
        read=lambda _etcd: FakeSource(CATALOG).read_all(),
        fetch=lambda _url: daemon or DaemonStatus("unused"),
    )


def table_lines(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


def test_rows_show_registration_mark_and_effective_state() -> None:
    rows = status.rows(snapshot_from(CATALOG))
    assert rows == [
        ("idle", "-", "-", "-", "-", "-", "-", "(no instances)"),
        ("web", "w1", "10.0.0.1:8080", "3", "up", "-", "lb-1=up, lb-2=down (HTTP 503)", "up"),
        ("web", "w2", "10.0.0.2:8080", "1", "up", "down (5xx rate) by monitor", "-", "down"),
        ("web", "w3", "[2001:db8::3]:8080", "1", "drain", "-", "-", "drain"),
    ]


def test_table_is_aligned_and_summarised() -> None:
    text = status.format_table(report())
    lines = text.splitlines()
    header = lines[0]
    assert header.split("  ")[0] == "SERVICE"
    assert " HEALTH MARK " in header
    # every column starts at the same offset on every row
    state_column = header.index("STATE")
    assert lines[3][state_column:].strip() == "down"
    assert lines[2][header.index("ADDRESS") :].startswith("10.0.0.1:8080")
    assert "etcd revision 1: 2 service(s), 3 instance(s): 1 up, 1 drain, 1 down" in text
    assert "rejected values (1), not in any config:" in text
    assert "  /lbsync/services/web/instances/bad: " in text
    assert "daemon" not in text  # no listen address, no daemon section


def test_empty_catalog() -> None:
    empty = StatusReport("/lbsync", snapshot_from({}), {})
    text = status.format_table(empty)
    assert text.startswith("no services under /lbsync/services/\n")
    assert "0 service(s), 0 instance(s): 0 up, 0 drain, 0 down" in text


def test_a_service_in_probe_panic_is_named_under_the_table() -> None:
    down = {"status": "down", "reason": "timeout"}
    catalog = {
        "services": {
            "web": {
                "instances": {"w1": "10.0.0.1:80", "w2": "10.0.0.2:80"},
                "probes": {"w1": {"lb-1": down}, "w2": {"lb-1": down}},
            }
        }
    }
    collected = status.collect(EtcdSettings(), read=lambda _etcd: FakeSource(catalog).read_all())
    text = status.format_table(collected)
    assert "probe panic (verdicts ignored, every registered-up instance kept): web\n" in text
    assert "2 up, 0 drain, 0 down" in text
    assert status.to_json(collected)["services"][0]["panic"] is True


def test_daemon_status_is_flattened_under_the_table() -> None:
    daemon = DaemonStatus(
        "http://127.0.0.1:9274/status",
        data={"ready": True, "etcd": {"connected": False, "stale_seconds": 12.5}, "held": []},
    )
    text = status.format_table(report(daemon))
    assert "daemon http://127.0.0.1:9274/status:\n" in text
    assert "  ready: true\n" in text
    assert "  etcd.connected: false\n" in text
    assert "  etcd.stale_seconds: 12.5\n" in text
    assert "  held: []\n" in text


def test_guard_holds_are_listed_with_the_command_that_releases_them() -> None:
    hold = {"reason": "update removes 2 of 3", "since": 1.0, "needs_confirmation": False}
    empty = {"reason": "the catalog is empty", "release_at": None, "needs_confirmation": True}
    held = {
        "catalog": empty,
        "services": {"web": {**hold, "release_at": 31.0}, "api": {**hold, "release_at": 40.0}},
    }
    text = status.format_table(report(DaemonStatus("http://x/status", data={"held": held})))
    lines = text.splitlines()
    start = lines.index("held by the guard (3):")
    catalog, web, api = lines[start + 1 : start + 4]
    assert catalog == "  the whole catalog: the catalog is empty (release: lbsync confirm)"
    assert web.startswith("  service web: update removes 2 of 3 (release: lbsync confirm")
    assert "--service web, or by itself at " in web
    assert "--service api, or by itself at " in api


def test_nothing_held_adds_no_guard_section() -> None:
    held = {"catalog": None, "services": {}}
    text = status.format_table(report(DaemonStatus("http://x/status", data={"held": held})))
    assert "held by the guard" not in text


def test_unreachable_daemon_is_a_line_not_an_error() -> None:
    daemon = DaemonStatus("http://127.0.0.1:9274/status", error="unreachable (refused)")
    text = status.format_table(report(daemon))
    assert text.rstrip().endswith("daemon http://127.0.0.1:9274/status: unreachable (refused)")


def test_json_document() -> None:
    daemon = DaemonStatus("http://127.0.0.1:9274/status", data={"ready": True})
    document = json.loads(json.dumps(status.to_json(report(daemon))))
    assert document["revision"] == 1
    assert document["prefix"] == "/lbsync"
    assert document["counts"] == {"services": 2, "up": 1, "drain": 1, "down": 1}
    web = next(s for s in document["services"] if s["name"] == "web")
    w2 = next(i for i in web["instances"] if i["id"] == "w2")
    assert w2 == {
        "id": "w2",
        "host": "10.0.0.2",
        "port": 8080,
        "address": "10.0.0.2:8080",
        "weight": 1,
        "registered": "up",
        "health": {"status": "down", "reason": "5xx rate", "by": "monitor"},
        "probes": {},
        "probed_down": False,
        "state": "down",
        "meta": {},
    }
    idle = next(s for s in document["services"] if s["name"] == "idle")
    assert idle == {
        "name": "idle",
        "settings": {"balance": "least_conn"},
        "panic": False,
        "instances": [],
    }
    w1 = next(i for i in web["instances"] if i["id"] == "w1")
    assert w1["probes"] == {
        "lb-1": {"status": "up", "reason": "", "since": 0},
        "lb-2": {"status": "down", "reason": "HTTP 503", "since": 0},
    }
    assert document["rejected"][0]["key"] == "/lbsync/services/web/instances/bad"
    assert document["daemon"] == {
        "url": "http://127.0.0.1:9274/status",
        "status": {"ready": True},
        "error": None,
    }


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("127.0.0.1:9274", "http://127.0.0.1:9274/status"),
        ("0.0.0.0:9274", "http://127.0.0.1:9274/status"),
        (":9274", "http://127.0.0.1:9274/status"),
        ("[::]:9274", "http://[::1]:9274/status"),
        ("[::1]:9000", "http://[::1]:9000/status"),
        ("lb1.example:9274", "http://lb1.example:9274/status"),
    ],
)
def test_status_url(listen: str, url: str) -> None:
    assert status.status_url(listen) == url


@pytest.mark.parametrize("listen", ["9274", "host:", "host:port", "::1:9274", "h:70000"])
def test_bad_listen_is_a_config_error(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"http\.listen"):
        status.status_url(listen)


def test_fetch_from_a_closed_port_is_unreachable() -> None:
    from tests.harness.net import free_port

    result = status.fetch_daemon_status(f"http://127.0.0.1:{free_port()}/status", timeout=2)
    assert result.data is None
    assert result.error is not None
    assert result.error.startswith("unreachable")


def test_status_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    from lbsync.cli import main

    with pytest.raises(SystemExit) as info:
        main(["status", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "lbsync status" in out
    assert "--json" in out
    assert "--http" in out


def test_status_survives_hostile_values_and_lists_them() -> None:
    """Issue 17: a ~10 KB nested value made `lbsync status` crash with RecursionError."""
    hostile: dict[str, Any] = {
        "services": {
            "web": {
                "instances": {
                    "w1": "10.0.0.1:8080",
                    "deep": "{" + '"a": {' * 3000 + "}" * 3001,
                    "zone": {"host": "::1%eth0\nprogram pwn", "port": 80},
                    "huge": '{"host": "10.0.0.2", "port": ' + "9" * 5000 + "}",
                },
                "settings": '{"keepalive": 1e400}',
            }
        }
    }
    result = status.collect(EtcdSettings(), None, read=lambda _etcd: FakeSource(hostile).read_all())
    assert [i.id for i in result.snapshot.services["web"].instances] == ["w1"]
    assert sorted(result.rejected) == [
        "/lbsync/services/web/instances/deep",
        "/lbsync/services/web/instances/huge",
        "/lbsync/services/web/instances/zone",
        "/lbsync/services/web/settings",
    ]
    text = status.format_table(result)
    assert "rejected values (4), not in any config:" in text
    assert json.dumps(status.to_json(result))
