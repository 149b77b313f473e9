"""Fakes and helpers for testing lbsync and your own templates without etcd or an LB.

Render a template against a catalog written as data, and compare with a golden file::

    from lbsync.testing import render_template, assert_golden

    def test_upstreams():
        out = render_template("templates/nginx/upstreams.conf.j2", "tests/catalog.json")
        assert_golden(out, "tests/golden/upstreams.conf")   # LBSYNC_UPDATE_GOLDEN=1 rewrites

A catalog file (JSON, TOML, or YAML when PyYAML is installed) looks like::

    {"services": {"web": {"instances": {"a": {"host": "10.0.0.1", "port": 80}},
                          "health": {"a": "drain"},
                          "settings": {"balance": "least_conn"},
                          "probes": {"a": {"lb-1": {"status": "down", "reason": "HTTP 503"}}}}},
     "keys": {"/config/greeting": "hello"}}

Values go through the same validation as values read from etcd, so a template test sees
exactly what production would (rejected values are listed in ``FakeCatalog.rejected``).
"""

from __future__ import annotations

import json
import os
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lbsync.catalog import Catalog
from lbsync.drivers.base import Driver, ReloadTicket
from lbsync.errors import InvalidValue, ReloadFailed, ValidationFailed, VerifyFailed
from lbsync.model import (
    KeyEvent,
    KeyValue,
    Snapshot,
    SourceEvents,
    SourceMessage,
    SourceReset,
    SourceStatus,
)
from lbsync.render import Renderer
from lbsync.stage.tree import StagedConfig

DEFAULT_PREFIX = "/lbsync"


def catalog_keys(data: Mapping[str, Any], prefix: str = DEFAULT_PREFIX) -> dict[str, bytes]:
    """The etcd keys and values that a catalog written as data stands for."""
    keys: dict[str, bytes] = {}
    for name, service in data.get("services", {}).items():
        base = f"{prefix}/services/{name}"
        for kind in ("instances", "health"):
            for iid, value in service.get(kind, {}).items():
                keys[f"{base}/{kind}/{iid}"] = _encode(value)
        if "settings" in service:
            keys[f"{base}/settings"] = _encode(service["settings"])
        for iid, verdicts in service.get("probes", {}).items():
            for prober, value in verdicts.items():
                keys[f"{base}/probes/{iid}/{prober}"] = _encode(value)
    for key, value in data.get("keys", {}).items():
        keys[prefix + key] = _encode(value)
    return keys


def _encode(value: object) -> bytes:
    return value.encode() if isinstance(value, str) else json.dumps(value).encode()


def load_catalog_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix in (".yaml", ".yml"):
        import yaml  # type: ignore[import-untyped]  # optional: only for YAML catalogs

        loaded: dict[str, Any] = yaml.safe_load(text)
        return loaded
    loaded = json.loads(text)
    return loaded


class FakeCatalog:
    """A catalog built from data, through the real validation, with a rejected list."""

    def __init__(self, data: Mapping[str, Any], prefix: str = DEFAULT_PREFIX, revision: int = 1):
        self.rejected: list[InvalidValue] = []
        self.catalog = Catalog(prefix, on_reject=self.rejected.append)
        kvs = [
            KeyValue(key=k, value=v, mod_revision=revision)
            for k, v in catalog_keys(data, prefix).items()
        ]
        self.catalog.load(kvs, revision)

    def snapshot(self) -> Snapshot:
        return self.catalog.snapshot()


def snapshot_from(data: Mapping[str, Any] | str | Path, prefix: str = DEFAULT_PREFIX) -> Snapshot:
    """A snapshot from a catalog given as data or as a JSON/TOML/YAML file."""
    if isinstance(data, str | Path):
        data = load_catalog_file(data)
    return FakeCatalog(data, prefix).snapshot()


def render_template(
    src: str | Path,
    catalog: Mapping[str, Any] | str | Path,
    extra: Mapping[str, Any] | None = None,
    *,
    sandbox: bool = False,
) -> str:
    """Render ``src`` exactly as the daemon would, against a catalog given as data or file."""
    renderer = Renderer(sandbox=sandbox)
    return renderer.render(Path(src).resolve(), snapshot_from(catalog), extra).decode()


def assert_golden(rendered: str, golden: str | Path) -> None:
    """Compare with a golden file; ``LBSYNC_UPDATE_GOLDEN=1`` rewrites it instead."""
    golden = Path(golden)
    if os.environ.get("LBSYNC_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(rendered, encoding="utf-8")
        return
    expected = golden.read_text(encoding="utf-8")
    if rendered != expected:
        import difflib

        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(True), rendered.splitlines(True), str(golden), "rendered"
            )
        )
        raise AssertionError(f"render differs from {golden}:\n{diff}")


class FakeSource:
    """An in-memory etcd for the daemon: ``put``/``delete`` from a test, ``run`` in a thread.

    ``available = False`` makes it behave like an unreachable etcd: it reports
    disconnected and sends no reset until made available again.
    """

    def __init__(self, data: Mapping[str, Any] | None = None, prefix: str = DEFAULT_PREFIX):
        self.revision = 1
        self.keys: dict[str, bytes] = catalog_keys(data or {}, prefix)
        self.prefix = prefix
        self.available = True
        self._pending: list[KeyEvent] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()

    def put(self, key: str, value: str | bytes | Mapping[str, Any]) -> int:
        raw = value if isinstance(value, bytes) else _encode(value)
        return self._change(KeyEvent(kind="put", key=key, value=raw, mod_revision=0))

    def delete(self, *keys: str) -> int:
        """Delete keys; several keys are one transaction, delivered as one batch."""
        return self._change(*(KeyEvent(kind="delete", key=key, mod_revision=0) for key in keys))

    def _change(self, *events: KeyEvent) -> int:
        with self._lock:
            self.revision += 1
            for change in events:
                event = change.model_copy(update={"mod_revision": self.revision})
                if event.kind == "put":
                    self.keys[event.key] = event.value
                else:
                    self.keys.pop(event.key, None)
                self._pending.append(event)
        self._wake.set()
        return self.revision

    def read_all(self) -> SourceReset:
        with self._lock:
            kvs = tuple(
                KeyValue(key=k, value=v, mod_revision=self.revision)
                for k, v in sorted(self.keys.items())
            )
            self._pending.clear()
            return SourceReset(revision=self.revision, kvs=kvs)

    def run(self, emit: Callable[[SourceMessage], None], stop: threading.Event) -> None:
        while not stop.is_set() and not self.available:
            emit(SourceStatus(connected=False, error="fake etcd unavailable"))
            stop.wait(0.05)
        if stop.is_set():
            return
        emit(self.read_all())
        emit(SourceStatus(connected=True, endpoint="fake", revision=self.revision))
        while not stop.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
            with self._lock:
                batch, self._pending = self._pending, []
            if batch:
                emit(SourceEvents(revision=batch[-1].mod_revision, events=tuple(batch)))

    def close(self) -> None:
        pass


class FakeDriver(Driver):
    """Records what the pipeline asked of the LB; can be told to fail at any step."""

    kind = "fake"

    def __init__(self, target: Any = None, *, runtime: bool = False) -> None:
        super().__init__(target)
        self.runtime = runtime
        self.calls: list[str] = []
        self.validated: list[dict[str, bytes]] = []
        self.fail_validate = False
        self.fail_reload = False
        self.fail_verify = False
        self.reloads = 0

    @property
    def name(self) -> str:
        return str(getattr(self.target, "name", "fake"))

    def validate(self, staged: StagedConfig) -> None:
        self.calls.append("validate")
        self.validated.append({str(d): p.read_bytes() for d, p in staged.files.items()})
        if self.fail_validate:
            raise ValidationFailed("check refused", command=["fake-check"], stderr="bad config")

    def reload(self) -> ReloadTicket:
        self.calls.append("reload")
        if self.fail_reload:
            raise ReloadFailed("reload refused", target=self.name)
        self.reloads += 1
        return ReloadTicket(started_at=time.monotonic())

    def verify(self, ticket: ReloadTicket) -> None:
        self.calls.append("verify")
        if self.fail_verify:
            self.fail_verify = False  # the LB comes back on the restored config
            raise VerifyFailed("no new workers", target=self.name)

    def runtime_update(self, old: Snapshot | None, new: Snapshot) -> bool:
        self.calls.append("runtime")
        return self.runtime and old is not None and set(old.services) == set(new.services)
