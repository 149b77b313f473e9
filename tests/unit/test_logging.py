import io
import json
from pathlib import Path

import structlog

from lbsync.errors import DriverError, InvalidValue, ReloadFailed
from lbsync.logging import configure_logging


def logged(**fields: object) -> dict[str, object]:
    """What one event looks like on the JSON stream ``configure_logging`` sets up."""
    stream = io.StringIO()
    configure_logging("debug", "json", stream)
    structlog.get_logger("lbsync.test").error("test.event", **fields)
    [line] = stream.getvalue().splitlines()
    event: dict[str, object] = json.loads(line)
    return event


def test_an_error_is_logged_as_its_message_and_its_context() -> None:
    err = InvalidValue("/lbsync/services/web/settings", {"x": 1}, "unknown setting")

    event = logged(error=err)

    assert event["error"] == str(err)
    assert event["key"] == "/lbsync/services/web/settings"
    assert event["value"] == "{'x': 1}"
    assert event["reason"] == "unknown setting"


def test_explicit_fields_win_over_the_error_context() -> None:
    event = logged(target="edge", error=DriverError("nginx is gone", target="nginx-test"))

    assert event["target"] == "edge"
    assert event["error"] == "target 'nginx-test': nginx is gone"


def test_the_error_context_comes_before_the_cause_context() -> None:
    cause = ReloadFailed("reload refused", target="from-cause")
    err = InvalidValue("k", "v", "from-error")
    event = logged(cause=cause, error=err)

    assert event["cause"] == str(cause)
    assert event["error"] == str(err)
    assert event["reason"] == "from-error"
    assert event["target"] == "from-cause"  # only the cause has one


def test_other_values_are_left_alone() -> None:
    event = logged(error="a plain string", count=3)

    assert event["error"] == "a plain string"
    assert event["count"] == 3
    assert "key" not in event


def test_values_json_cannot_hold_become_strings_and_json_values_stay() -> None:
    event = logged(path=Path("/etc/nginx/conf.d/x.conf"), kinds={1, 2} - {2}, ok=True, n=None)

    assert event["path"] == "/etc/nginx/conf.d/x.conf"
    assert event["kinds"] == "{1}"
    assert event["ok"] is True
    assert event["n"] is None
