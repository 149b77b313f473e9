"""etcd RBAC as docs/security.md sets it up, against a real etcd with TLS and auth.

The roles are made with the document's own ``etcdctl`` commands (``RBAC_COMMANDS``; a
test checks that each appears verbatim in the document). What is shown, through lbsync's
own client code (``Registrar``, ``mark``, ``EtcdWriter``, ``EtcdSource``):

- a web backend's user registers, refreshes and removes its own instance key, and is
  refused (``permission denied``) on another service's instances, on its own service's
  settings and on health marks;
- a web monitor's user writes health marks of web only;
- lbsync's own user reads and watches the whole prefix and cannot write anything.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lbsync.config import EtcdSettings
from lbsync.errors import ConfigError, SourceError
from lbsync.keys import health_key, instance_key
from lbsync.model import State
from lbsync.registrar import InstanceSpec, Registrar, mark
from lbsync.source import EtcdWriter
from tests.harness.etcd import ROOT_PASSWORD, EtcdServer, RunningSource, TlsFiles
from tests.harness.net import wait_for

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"
PREFIX = "/lbsync"

# docs/security.md, "etcd RBAC", in the same order (users are added with a password).
WEB = "/lbsync/services/web"
RBAC_COMMANDS = [
    "etcdctl role add lbsync-read",
    "etcdctl role grant-permission lbsync-read --prefix=true read /lbsync/",
    "etcdctl role add web-backend",
    f"etcdctl role grant-permission web-backend --prefix=true readwrite {WEB}/instances/",
    "etcdctl role add web-monitor",
    f"etcdctl role grant-permission web-monitor --prefix=true readwrite {WEB}/health/",
    "etcdctl user grant-role lbsync lbsync-read",
    "etcdctl user grant-role web-backend web-backend",
    "etcdctl user grant-role web-monitor web-monitor",
]
USERS = ("lbsync", "web-backend", "web-monitor")


def test_the_commands_are_the_documents() -> None:
    text = DOC.read_text()
    for command in RBAC_COMMANDS:
        assert command in text, command
    for user in USERS:
        assert f"etcdctl user add {user}" in text, user
    assert "etcdctl user add root" in text
    assert "etcdctl auth enable" in text


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return TlsFiles.generate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def rbac_etcd(tmp_path_factory: pytest.TempPathFactory, tls: TlsFiles) -> Iterator[EtcdServer]:
    """One etcd for the module: TLS with client certificates, the document's roles, auth on."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "etcd", tls=tls)
    try:
        server.start()
        server.etcdctl("user", "add", f"root:{ROOT_PASSWORD}")
        server.etcdctl("user", "grant-role", "root", "root")
        for user in USERS:
            server.etcdctl("user", "add", f"{user}:{password(user)}")
        for command in RBAC_COMMANDS:
            server.etcdctl(*command.split()[1:])
        server.etcdctl("auth", "enable")
        server.auth_enabled = True
        yield server
    finally:
        server.kill()


def password(user: str) -> str:
    return f"{user}-test-password"


@pytest.fixture(scope="module")
def as_user(
    rbac_etcd: EtcdServer, tls: TlsFiles, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], EtcdSettings]:
    secrets = tmp_path_factory.mktemp("secrets")

    def settings(user: str) -> EtcdSettings:
        path = secrets / user
        path.write_text(f"{password(user)}\n")
        path.chmod(0o600)
        values: dict[str, object] = {
            "endpoints": [rbac_etcd.endpoint],
            "prefix": PREFIX,
            "timeout": 5.0,
            "user": user,
            "password_file": path,
            **tls.client_settings(),
        }
        return EtcdSettings.model_validate(values)

    return settings


def refused(write: Callable[[], object]) -> str:
    """The message of the ``permission denied`` error ``write`` raises."""
    with pytest.raises((SourceError, ConfigError), match="permission denied") as caught:
        write()
    return str(caught.value)


WEB_A = instance_key(PREFIX, "web", "a")
VALUE = '{"host": "10.0.0.1", "port": 8080}'


def test_a_backend_registers_and_removes_its_own_instance(
    rbac_etcd: EtcdServer, as_user: Callable[[str], EtcdSettings]
) -> None:
    spec = InstanceSpec("web", "a", "10.0.0.1", 8080)
    registrar = Registrar(as_user("web-backend"), spec, ttl=10.0)
    stop = threading.Event()
    thread = threading.Thread(target=registrar.run, args=(stop,), name="registrar")
    thread.start()
    try:
        wait_for(lambda: WEB_A in rbac_etcd.dump(f"{PREFIX}/"), what="the registration")
    finally:
        stop.set()
        thread.join(timeout=15)
    assert not thread.is_alive()
    wait_for(lambda: WEB_A not in rbac_etcd.dump(f"{PREFIX}/"), what="the deregistration")

    with EtcdWriter(as_user("web-backend")) as writer:  # plain put, get and delete too
        writer.put(instance_key(PREFIX, "web", "b"), VALUE)
        assert writer.get(instance_key(PREFIX, "web", "b")) == VALUE.encode()
        assert writer.delete(instance_key(PREFIX, "web", "b"))


@pytest.mark.parametrize(
    "key",
    [
        instance_key(PREFIX, "api", "x"),
        f"{PREFIX}/services/web/settings",
        health_key(PREFIX, "web", "a"),
        f"{PREFIX}/services/web/instancesX",  # the grant ends in "/": no sibling prefix
    ],
    ids=["another service", "own settings", "health mark", "sibling prefix"],
)
def test_a_backend_cannot_write_outside_its_instances(
    rbac_etcd: EtcdServer, as_user: Callable[[str], EtcdSettings], key: str
) -> None:
    rbac_etcd.etcdctl("put", key, VALUE)  # root writes it, so a delete has something to do
    try:
        with EtcdWriter(as_user("web-backend")) as writer:
            refused(lambda: writer.put(key, VALUE))
            refused(lambda: writer.delete(key))
        assert rbac_etcd.dump(key)[key] == VALUE.encode()
    finally:
        rbac_etcd.etcdctl("del", key)


def test_a_backend_cannot_mark_health_and_a_monitor_can_only_mark(
    rbac_etcd: EtcdServer, as_user: Callable[[str], EtcdSettings]
) -> None:
    health = health_key(PREFIX, "web", "a")
    refused(lambda: mark(as_user("web-backend"), "web", "a", State.DOWN, reason="sick"))
    monitor = as_user("web-monitor")
    mark(monitor, "web", "a", State.DOWN, reason="sick", by="prober")
    assert b'"down"' in rbac_etcd.dump(health)[health]
    mark(monitor, "web", "a", State.UP)  # clears the mark
    assert health not in rbac_etcd.dump(health)
    refused(lambda: mark(monitor, "api", "x", State.DOWN, reason="sick"))
    with EtcdWriter(monitor) as writer:
        refused(lambda: writer.put(WEB_A, VALUE))


def test_lbsync_reads_and_watches_but_cannot_write(
    rbac_etcd: EtcdServer,
    as_user: Callable[[str], EtcdSettings],
    run_source: Callable[..., RunningSource],
) -> None:
    reader = as_user("lbsync")
    with EtcdWriter(as_user("web-backend")) as backend:
        backend.put(WEB_A, VALUE)
        running = run_source(reader)
        recorder = running.recorder
        wait_for(recorder.connected, what="the watch as the read-only user")
        backend.put(instance_key(PREFIX, "web", "c"), VALUE)  # arrives through the watch
        wait_for(
            lambda: recorder.snapshot() == rbac_etcd.dump(f"{PREFIX}/"),
            what="the read-only user to see every key",
        )
        assert instance_key(PREFIX, "web", "c") in recorder.snapshot()
        backend.delete(WEB_A)
        backend.delete(instance_key(PREFIX, "web", "c"))
    assert recorder.errors == []
    with EtcdWriter(reader) as writer:
        refused(lambda: writer.put(WEB_A, VALUE))
        refused(lambda: writer.delete(f"{PREFIX}/services/web/settings"))
