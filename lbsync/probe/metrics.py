"""The prober's /metrics: checks by result, check latency, instances by verdict, etcd writes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

CHECKS = Counter(
    "lbsync_probe_checks", "Checks run, by service and result (ok, fail).",
    ["service", "result"], registry=REGISTRY,
)  # fmt: skip
CHECK_SECONDS = Histogram(
    "lbsync_probe_check_seconds", "Time one check took, failures included.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)  # fmt: skip
INSTANCES = Gauge(
    "lbsync_probe_instances", "Instances checked, by this prober's verdict (up, down, unknown).",
    ["verdict"], registry=REGISTRY,
)  # fmt: skip
ETCD_WRITES = Counter(
    "lbsync_probe_etcd_writes", "Verdict writes to etcd, by operation (put, delete) and outcome.",
    ["op", "outcome"], registry=REGISTRY,
)  # fmt: skip
