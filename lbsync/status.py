"""``lbsync status``: what etcd says (services, instances, marks, probe verdicts) and what the
daemon says.

One read of the prefix, through the same catalog the daemon uses, so the effective state
shown is the one the templates get and a rejected value is listed with its reason. When
``[http] listen`` is set (or ``--http`` given) the daemon's own ``/status`` is fetched
with a short timeout and shown under the table; an unreachable daemon is reported, not
an error.

``format_table`` and ``to_json`` are pure functions of a ``StatusReport``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lbsync.catalog import Catalog
from lbsync.config import EtcdSettings
from lbsync.http import parse_listen
from lbsync.model import Instance, Snapshot, SourceReset, State
from lbsync.probes import DEFAULT_POLICY, ProbePolicy

DAEMON_TIMEOUT = 2.0

ReadPrefix = Callable[[EtcdSettings], SourceReset]


@dataclass(frozen=True)
class DaemonStatus:
    url: str
    data: Mapping[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True)
class StatusReport:
    prefix: str
    snapshot: Snapshot
    rejected: Mapping[str, str]  # key → why it was refused
    daemon: DaemonStatus | None = None


# --- collecting ------------------------------------------------------------------------


def read_prefix(settings: EtcdSettings) -> SourceReset:
    from lbsync.source.etcd import EtcdSource

    source = EtcdSource(settings)
    try:
        return source.read_all()
    finally:
        source.close()


def status_url(listen: str) -> str:
    """``[http] listen`` → the URL to ask: a wildcard address is asked on loopback."""
    host, port = parse_listen(listen)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/status"


def fetch_daemon_status(url: str, timeout: float = DAEMON_TIMEOUT) -> DaemonStatus:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = json.load(response)
    except urllib.error.HTTPError as exc:
        return DaemonStatus(url, error=f"HTTP {exc.code} {exc.reason}")
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return DaemonStatus(url, error=f"unreachable ({reason})")
    if not isinstance(data, dict):
        return DaemonStatus(url, error="not a JSON object")
    return DaemonStatus(url, data=data)


def collect(
    etcd: EtcdSettings,
    listen: str | None = None,
    *,
    read: ReadPrefix = read_prefix,
    fetch: Callable[[str], DaemonStatus] = fetch_daemon_status,
    probes: ProbePolicy = DEFAULT_POLICY,
) -> StatusReport:
    """Read etcd once (raises ``SourceError``) and, with ``listen``, ask the daemon.

    ``probes`` should be the daemon's quorum and panic threshold, so the state shown is its.
    """
    catalog = Catalog(etcd.prefix, probes=probes)
    catalog.reset(read(etcd))
    rejected = {key: err.reason for key, err in sorted(catalog.rejected.items())}
    daemon = fetch(status_url(listen)) if listen else None
    return StatusReport(etcd.prefix, catalog.snapshot(), rejected, daemon)


# --- presenting ------------------------------------------------------------------------

HEADER = (
    "SERVICE", "INSTANCE", "ADDRESS", "WEIGHT", "REGISTERED", "HEALTH MARK", "PROBES", "STATE",
)  # fmt: skip


def _mark(instance: Instance) -> str:
    mark = instance.health
    if mark is None:
        return "-"
    text = mark.status.value
    if mark.reason:
        text += f" ({mark.reason})"
    if mark.by:
        text += f" by {mark.by}"
    return text


def _probes(instance: Instance) -> str:
    """``lb-1=down (HTTP 503), lb-2=up``: every live prober's verdict, by prober name."""
    if not instance.probes:
        return "-"
    verdicts = []
    for prober, verdict in sorted(instance.probes.items()):
        reason = f" ({verdict.reason})" if verdict.reason else ""
        verdicts.append(f"{prober}={verdict.status.value}{reason}")
    return ", ".join(verdicts)


def rows(snapshot: Snapshot) -> list[tuple[str, ...]]:
    """One row per instance; a service without instances gets one row saying so."""
    out: list[tuple[str, ...]] = []
    for name, service in snapshot.services.items():
        if not service.instances:
            out.append((name, "-", "-", "-", "-", "-", "-", "(no instances)"))
        for i in service.instances:
            registered = i.registered_state.value
            row = (name, i.id, i.address, str(i.weight), registered, _mark(i), _probes(i))
            out.append((*row, i.state.value))
    return out


def _counts(snapshot: Snapshot) -> dict[str, int]:
    counts = {state.value: 0 for state in State}
    for service in snapshot.services.values():
        for instance in service.instances:
            counts[instance.state.value] += 1
    return counts


def format_table(report: StatusReport) -> str:
    snapshot = report.snapshot
    lines: list[str] = []
    table = rows(snapshot)
    if table:
        widths = [max(len(row[i]) for row in [HEADER, *table]) for i in range(len(HEADER))]
        for row in [HEADER, *table]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    else:
        lines.append(f"no services under {report.prefix}/services/")
    counts = _counts(snapshot)
    lines.append("")
    lines.append(
        f"etcd revision {snapshot.revision}: {len(snapshot.services)} service(s), "
        f"{snapshot.instance_count} instance(s): "
        + ", ".join(f"{counts[s.value]} {s.value}" for s in State)
    )
    panics = [name for name, service in snapshot.services.items() if service.panic]
    if panics:
        lines.append(
            "probe panic (verdicts ignored, every registered-up instance kept): "
            + ", ".join(panics)
        )
    if report.rejected:
        lines.append(f"rejected values ({len(report.rejected)}), not in any config:")
        lines.extend(f"  {key}: {reason}" for key, reason in report.rejected.items())
    if report.daemon is not None:
        lines.append("")
        daemon = report.daemon
        if daemon.data is None:
            lines.append(f"daemon {daemon.url}: {daemon.error}")
        else:
            lines.extend(guard_lines(daemon.data))
            lines.append(f"daemon {daemon.url}:")
            lines.extend(f"  {key}: {value}" for key, value in _flatten(daemon.data))
    return "\n".join(lines) + "\n"


def guard_lines(data: Mapping[str, Any]) -> list[str]:
    """What the daemon's guard holds, one line each, with the command that releases it."""
    held = data.get("held")
    if not isinstance(held, Mapping):
        return []
    holds: list[tuple[str | None, Any]] = []  # (service, hold); None: the whole catalog
    if isinstance(held.get("catalog"), Mapping):
        holds.append((None, held["catalog"]))
    if isinstance(held.get("services"), Mapping):
        holds.extend(held["services"].items())
    lines = []
    for service, hold in holds:
        if not isinstance(hold, Mapping):
            continue
        what = "the whole catalog" if service is None else f"service {service}"
        release = "lbsync confirm" if service is None else f"lbsync confirm --service {service}"
        until = hold.get("release_at")
        if isinstance(until, int | float):
            release += f", or by itself at {_clock_time(until)}"
        lines.append(f"  {what}: {hold.get('reason')} (release: {release})")
    return [f"held by the guard ({len(lines)}):", *lines, ""] if lines else []


def _clock_time(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Nested objects as dotted keys; lists and scalars as compact JSON."""
    out: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.extend(_flatten(value, f"{name}."))
        elif isinstance(value, str):
            out.append((name, value))
        else:
            out.append((name, json.dumps(value, default=str)))
    return out


def to_json(report: StatusReport) -> dict[str, Any]:
    """The whole report as one JSON-able document (``lbsync status --json``)."""
    snapshot = report.snapshot
    services = []
    for name, service in snapshot.services.items():
        instances = [
            {
                "id": i.id,
                "host": i.host,
                "port": i.port,
                "address": i.address,
                "weight": i.weight,
                "registered": i.registered_state.value,
                "health": None if i.health is None else i.health.model_dump(mode="json"),
                "probes": {p: v.model_dump(mode="json") for p, v in i.probes.items()},
                "probed_down": i.probed_down,
                "state": i.state.value,
                "meta": dict(i.meta),
            }
            for i in service.instances
        ]
        services.append(
            {
                "name": name,
                "settings": dict(service.settings),
                "panic": service.panic,
                "instances": instances,
            }
        )
    daemon = report.daemon
    return {
        "prefix": report.prefix,
        "revision": snapshot.revision,
        "services": services,
        "counts": {"services": len(snapshot.services), **_counts(snapshot)},
        "rejected": [{"key": k, "reason": r} for k, r in report.rejected.items()],
        "daemon": None
        if daemon is None
        else {"url": daemon.url, "status": daemon.data, "error": daemon.error},
    }
