"""lbsync.metrics: what each function does to the series in the private registry."""

from __future__ import annotations

import itertools

import prometheus_client
import pytest

from lbsync import metrics
from lbsync.errors import RenderError, ValidationFailed, VerifyFailed
from lbsync.outcome import Outcome
from lbsync.testing import snapshot_from

_names = itertools.count()


@pytest.fixture(autouse=True)
def series() -> metrics._Series:
    """The series, built (``metrics.enable``) before the test records anything."""
    return metrics.enable()


@pytest.fixture
def target() -> str:
    """A target name no other test uses: the registry is process-wide, so compare deltas."""
    return f"t{next(_names)}"


def value(name: str, **labels: str) -> float:
    found = metrics.enable().registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_the_registry_is_private_and_prefixed() -> None:
    assert metrics.enable().registry is not prometheus_client.REGISTRY
    assert prometheus_client.REGISTRY.get_sample_value("lbsync_rejected_values_total") is None
    text = prometheus_client.generate_latest(metrics.enable().registry).decode()
    own = {
        line.split()[2]
        for line in text.splitlines()
        if line.startswith("# TYPE") and not line.split()[2].startswith(("process_", "python_"))
    }
    assert own, text
    assert all(name.startswith("lbsync_") for name in own), own
    assert "_created" not in text
    assert "process_resident_memory_bytes" in text


def test_reloaded_round(target: str) -> None:
    durations = {"render": 1.5, "validate": 12.0, "runtime": 0.01, "swap": 0.4, "reload": 0.2}
    durations["verify"] = 80.0
    metrics.record_outcome(Outcome(target, 7, "reloaded", ("/x",), None, durations))
    assert value("lbsync_rounds_total", target=target, action="reloaded") == 1
    assert value("lbsync_reloads_total", target=target, result="ok") == 1
    assert value("lbsync_reloads_total", target=target, result="failed") == 0
    assert value("lbsync_last_round_success", target=target) == 1
    assert value("lbsync_last_success_timestamp_seconds", target=target) > 0
    for stage, ms in durations.items():
        assert value("lbsync_stage_seconds_count", target=target, stage=stage) == 1
        assert value("lbsync_stage_seconds_sum", target=target, stage=stage) == pytest.approx(
            ms / 1000
        )
    # 12 ms of validation falls in the 25 ms bucket, not the 10 ms one
    assert value("lbsync_stage_seconds_bucket", target=target, stage="validate", le="0.01") == 0
    assert value("lbsync_stage_seconds_bucket", target=target, stage="validate", le="0.025") == 1


def test_unchanged_and_runtime_rounds_reload_nothing(target: str) -> None:
    metrics.record_outcome(Outcome(target, 1, "unchanged", durations={"render": 1.0}))
    metrics.record_outcome(
        Outcome(target, 2, "runtime", ("/x",), durations={"render": 1.0, "runtime": 0.3})
    )
    assert value("lbsync_rounds_total", target=target, action="unchanged") == 1
    assert value("lbsync_rounds_total", target=target, action="runtime") == 1
    assert value("lbsync_runtime_updates_total", target=target) == 1
    assert value("lbsync_reloads_total", target=target, result="ok") == 0
    assert value("lbsync_reloads_total", target=target, result="failed") == 0


def test_validation_failure(target: str) -> None:
    error = ValidationFailed("nginx -t refused", command=["nginx", "-t"], returncode=1)
    metrics.record_outcome(
        Outcome(target, 3, "failed", error=error, durations={"render": 1, "validate": 5})
    )
    assert value("lbsync_validation_failures_total", target=target) == 1
    assert value("lbsync_rounds_total", target=target, action="failed") == 1
    assert value("lbsync_round_errors_total", target=target, error="ValidationFailed") == 1
    assert value("lbsync_last_round_success", target=target) == 0
    assert value("lbsync_reloads_total", target=target, result="failed") == 0


def test_render_failure_is_not_a_validation_failure(target: str) -> None:
    error = RenderError("undefined", template="t.j2", line=3)
    metrics.record_outcome(Outcome(target, 3, "failed", error=error))
    assert value("lbsync_validation_failures_total", target=target) == 0
    assert value("lbsync_round_errors_total", target=target, error="RenderError") == 1


def test_rolled_back_round(target: str) -> None:
    error = VerifyFailed("no new workers", target=target)
    durations = {"render": 1, "validate": 5, "swap": 1, "reload": 1, "verify": 10}
    metrics.record_outcome(Outcome(target, 4, "rolled_back", ("/x",), error, durations))
    assert value("lbsync_rollbacks_total", target=target) == 1
    assert value("lbsync_reloads_total", target=target, result="failed") == 1
    assert value("lbsync_reloads_total", target=target, result="ok") == 0
    assert value("lbsync_last_round_success", target=target) == 0


def test_success_after_failure_sets_the_gauge_back(target: str) -> None:
    metrics.record_outcome(Outcome(target, 1, "failed", error=RenderError("x", template="t")))
    metrics.record_outcome(Outcome(target, 2, "reloaded", durations={"reload": 1}))
    assert value("lbsync_last_round_success", target=target) == 1


def test_init_targets_creates_zero_series(target: str) -> None:
    assert (
        metrics.enable().registry.get_sample_value(
            "lbsync_rounds_total", {"target": target, "action": "failed"}
        )
        is None
    )
    metrics.init_targets([target])
    for action in metrics.ACTIONS:
        labels = {"target": target, "action": action}
        assert metrics.enable().registry.get_sample_value("lbsync_rounds_total", labels) == 0
    labels = {"target": target, "result": "failed"}
    assert metrics.enable().registry.get_sample_value("lbsync_reloads_total", labels) == 0
    assert (
        metrics.enable().registry.get_sample_value("lbsync_guard_holds_total", {"target": target})
        == 0
    )


def test_event_to_apply_buckets(target: str) -> None:
    metrics.observe_event_to_apply(0.004, target)
    metrics.observe_event_to_apply(0.025, target)
    bucket = "lbsync_event_to_apply_seconds_bucket"
    assert value(bucket, target=target, le="0.003") == 0
    assert value(bucket, target=target, le="0.005") == 1
    assert value(bucket, target=target, le="0.03") == 2
    assert value("lbsync_event_to_apply_seconds_count", target=target) == 2
    assert metrics.LATENCY_BUCKETS[0] == 0.001
    assert metrics.LATENCY_BUCKETS[-1] == 10.0


def test_catalog_gauges_follow_snapshots() -> None:
    first = snapshot_from(
        {
            "services": {
                "gauge-a": {
                    "instances": {
                        "i1": {"host": "10.0.0.1", "port": 80},
                        "i2": {"host": "10.0.0.2", "port": 80},
                        "i3": {"host": "10.0.0.3", "port": 80, "state": "drain"},
                    },
                    "health": {"i2": "down"},
                },
                "gauge-b": {"instances": {"j1": "10.0.1.1:80"}},
            }
        }
    )
    metrics.set_catalog(first)
    assert value("lbsync_instances", service="gauge-a", state="up") == 1
    assert value("lbsync_instances", service="gauge-a", state="drain") == 1
    assert value("lbsync_instances", service="gauge-a", state="down") == 1
    assert value("lbsync_instances", service="gauge-b", state="up") == 1

    second = snapshot_from({"services": {"gauge-a": {"instances": {"i1": "10.0.0.1:80"}}}})
    metrics.set_catalog(second)
    assert value("lbsync_instances", service="gauge-a", state="up") == 1
    assert value("lbsync_instances", service="gauge-a", state="down") == 0
    labels = {"service": "gauge-b", "state": "up"}
    assert metrics.enable().registry.get_sample_value("lbsync_instances", labels) is None  # cleared


def test_set_catalog_recounts_only_changed_services() -> None:
    data = {"services": {"memo": {"instances": {"a": "10.0.0.1:80"}}}}
    snapshot = snapshot_from(data)
    metrics.set_catalog(snapshot)
    # Tamper with the gauge: an unchanged Service object is not recounted ...
    metrics.enable().instances.labels("memo", "up").set(42)
    metrics.set_catalog(snapshot.model_copy(update={"revision": snapshot.revision + 1}))
    assert value("lbsync_instances", service="memo", state="up") == 42
    # ... a new one is.
    metrics.set_catalog(snapshot_from(data))
    assert value("lbsync_instances", service="memo", state="up") == 1


def test_etcd_gauges() -> None:
    metrics.set_etcd(True, 1234, 1_700_000_000.5)
    assert value("lbsync_etcd_connected") == 1
    assert value("lbsync_last_sync_revision") == 1234
    assert value("lbsync_last_sync_timestamp_seconds") == 1_700_000_000.5
    metrics.set_etcd(False, 1234, None)  # lost: the timestamp stays where it was
    assert value("lbsync_etcd_connected") == 0
    assert value("lbsync_last_sync_timestamp_seconds") == 1_700_000_000.5


def test_guard_rejections_and_alerts(target: str) -> None:
    rejected = value("lbsync_rejected_values_total")
    alerts = value("lbsync_alerts_total", kind="rollback_failed")
    metrics.guard_held(target)
    metrics.guard_held(target)
    metrics.set_guard(2, True)
    assert value("lbsync_guard_holds_total", target=target) == 2
    assert value("lbsync_guard_holding") == 1
    assert value("lbsync_guard_held_services") == 2
    metrics.set_guard(0, False)
    assert value("lbsync_guard_holding") == 0
    assert value("lbsync_guard_held_services") == 0
    metrics.value_rejected()
    metrics.alert("rollback_failed")
    assert value("lbsync_rejected_values_total") == rejected + 1
    assert value("lbsync_alerts_total", kind="rollback_failed") == alerts + 1


def test_build_info() -> None:
    from lbsync import __version__

    assert value("lbsync_build_info", version=__version__) == 1
