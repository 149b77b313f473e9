"""etcd over TLS (client certificates) and with user/password auth, against a real etcd.

The server runs with ``--client-cert-auth`` and a throw-away CA made by ``openssl``;
auth gives the lbsync user read-write on the prefix only. What is checked: both the
source and the writer work with ``ca_file``/``cert_file``/``key_file`` and ``user`` +
``password_file``; every refusal is one clean ``SourceError`` that names the endpoint;
an auth token that etcd has expired is replaced by authenticating again (pitfall 7).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from lbsync.cli import main as cli
from lbsync.config import EtcdSettings
from lbsync.errors import SourceError, SourceUnavailable
from lbsync.source import EtcdSource, EtcdWriter
from tests.harness.etcd import EtcdServer, RunningSource, SourceRecorder, TcpProxy, TlsFiles
from tests.harness.net import free_port, wait_for

pytestmark = pytest.mark.integration

PREFIX = "/lbsync"
USER = "lbsync"
PASSWORD = "s3cret-for-tests"


def etcd_settings(*endpoints: str, **overrides: object) -> EtcdSettings:
    values: dict[str, object] = {"endpoints": list(endpoints), "prefix": PREFIX, "timeout": 5.0}
    values.update(overrides)
    return EtcdSettings.model_validate(values)


def converged(etcd: EtcdServer, recorder: SourceRecorder) -> Callable[[], bool]:
    return lambda: recorder.snapshot() == etcd.dump(f"{PREFIX}/")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return TlsFiles.generate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "etcd-password"
    path.write_text(f"{PASSWORD}\n")
    path.chmod(0o600)
    return path


def _server(tmp_path: Path, **kwargs: object) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path / "etcd", **kwargs)  # type: ignore[arg-type]
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture
def tls_etcd(tmp_path: Path, tls: TlsFiles) -> Iterator[EtcdServer]:
    """TLS with client certificates required; no auth."""
    yield from _server(tmp_path, tls=tls)


@pytest.fixture
def auth_etcd(tmp_path: Path, tls: TlsFiles) -> Iterator[EtcdServer]:
    """TLS with client certificates, and auth on: USER may read and write PREFIX only."""
    for server in _server(tmp_path, tls=tls):
        server.enable_auth(USER, PASSWORD, PREFIX)
        yield server


@pytest.fixture
def auth_settings(auth_etcd: EtcdServer, tls: TlsFiles, password_file: Path) -> EtcdSettings:
    return etcd_settings(
        auth_etcd.endpoint, user=USER, password_file=password_file, **tls.client_settings()
    )


# --- TLS -------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_source_and_writer_work_over_tls_with_a_client_certificate(
    tls_etcd: EtcdServer, tls: TlsFiles, run_source: Callable[..., RunningSource], transport: str
) -> None:
    settings = etcd_settings(tls_etcd.endpoint, transport=transport, **tls.client_settings())
    with EtcdWriter(settings) as writer:
        writer.put(f"{PREFIX}/before", "1")
        running = run_source(settings)
        rec = running.recorder
        wait_for(rec.connected, what="the watch over TLS")
        writer.put(f"{PREFIX}/after", "2")
        assert writer.get(f"{PREFIX}/after") == b"2"
        wait_for(converged(tls_etcd, rec), what="the event over TLS")
    assert rec.statuses()[-1].endpoint == tls_etcd.endpoint
    assert tls_etcd.endpoint.startswith("https://")


def test_an_endpoint_without_a_scheme_uses_tls_when_a_ca_is_set(
    tls_etcd: EtcdServer, tls: TlsFiles
) -> None:
    settings = etcd_settings(f"127.0.0.1:{tls_etcd.client_port}", **tls.client_settings())
    with EtcdWriter(settings) as writer:
        writer.put(f"{PREFIX}/a", "1")
        assert writer.endpoint == tls_etcd.endpoint


@pytest.mark.parametrize("mistake", ["no client certificate", "another CA"])
def test_a_refused_tls_handshake_is_a_clean_source_error_naming_the_endpoint(
    tls_etcd: EtcdServer, tls: TlsFiles, tmp_path: Path, mistake: str
) -> None:
    if mistake == "no client certificate":
        settings = etcd_settings(tls_etcd.endpoint, ca_file=tls.ca, timeout=3.0)
    else:
        other = TlsFiles.generate(tmp_path / "other-ca")
        settings = etcd_settings(tls_etcd.endpoint, timeout=3.0, **other.client_settings())
    source = EtcdSource(settings)
    try:
        with pytest.raises(SourceUnavailable) as caught:
            source.read_all()
    finally:
        source.close()
    assert str(caught.value).startswith(f"etcd {tls_etcd.endpoint}: ")
    assert "Traceback" not in str(caught.value)


# --- user and password ------------------------------------------------------------------


def test_user_and_password_file_over_tls_for_source_and_writer(
    auth_etcd: EtcdServer, auth_settings: EtcdSettings, run_source: Callable[..., RunningSource]
) -> None:
    with EtcdWriter(auth_settings) as writer:
        writer.put(f"{PREFIX}/services/web/instances/a", "10.0.0.1:80")
        running = run_source(auth_settings)
        rec = running.recorder
        wait_for(rec.connected, what="the watch as the lbsync user")
        writer.put(f"{PREFIX}/services/web/instances/b", "10.0.0.2:80")
        wait_for(converged(auth_etcd, rec), what="the event as the lbsync user")

        with pytest.raises(SourceError, match="permission denied") as caught:
            writer.put("/outside/the/prefix", "x")  # the role covers PREFIX only
    assert caught.value.endpoint == auth_etcd.endpoint
    assert rec.errors == []


def test_a_wrong_password_is_a_clean_source_error_naming_the_endpoint(
    auth_etcd: EtcdServer,
    auth_settings: EtcdSettings,
    password_file: Path,
    run_source: Callable[..., RunningSource],
) -> None:
    password_file.write_text("not-the-password\n")
    writer = EtcdWriter(auth_settings)
    with pytest.raises(SourceError) as caught:
        writer.put(f"{PREFIX}/a", "1")
    writer.close()
    message = str(caught.value)
    assert message == (
        f"etcd {auth_etcd.endpoint}: authentication as 'lbsync' failed: "
        "etcdserver: authentication failed, invalid user ID or password"
    )
    assert type(caught.value) is SourceError  # not "unavailable": retrying will not help

    # The daemon's source keeps retrying, reports why, and never hands out a reset...
    running = run_source(auth_settings)
    rec = running.recorder
    wait_for(lambda: len(rec.statuses()) >= 2, what="two refused attempts")
    assert rec.resets() == []
    assert all(s.error and "authentication as 'lbsync' failed" in s.error for s in rec.statuses())
    # ...and reads the password file again on every attempt: fixing it is enough.
    password_file.write_text(f"{PASSWORD}\n")
    wait_for(rec.connected, what="the watch once the password file is fixed")
    assert len(rec.resets()) == 1


def test_a_wrong_password_on_the_command_line_is_one_line_without_traceback(
    auth_etcd: EtcdServer,
    auth_settings: EtcdSettings,
    password_file: Path,
    tls: TlsFiles,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    password_file.write_text("wrong\n")
    config = tmp_path / "lbsync.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[etcd]\nendpoints = ["{auth_etcd.endpoint}"]\nprefix = "{PREFIX}"\n'
        f'ca_file = "{tls.ca}"\ncert_file = "{tls.client_cert}"\nkey_file = "{tls.client_key}"\n'
        f'user = "{USER}"\npassword_file = "{password_file}"\n'
        '[[target]]\nname = "t"\ndriver = "command"\nreload_command = "true"\n'
        f'[[target.template]]\nsrc = "t.j2"\ndest = "{tmp_path / "out.conf"}"\n'
    )
    assert cli(["mark", "web", "a", "down", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"lbsync: etcd {auth_etcd.endpoint}: authentication as 'lbsync' failed: "
        "etcdserver: authentication failed, invalid user ID or password\n"
    )


def test_user_and_password_work_over_plain_http_with_a_warning(
    tmp_path: Path, password_file: Path
) -> None:
    """pyetcd sends the token as call credentials, which gRPC refuses on plain channels;
    lbsync sends it as metadata, as etcd's Go client does, and warns."""
    for server in _server(tmp_path):
        server.enable_auth(USER, PASSWORD, PREFIX)
        settings = etcd_settings(server.endpoint, user=USER, password_file=password_file)
        with structlog.testing.capture_logs() as logs, EtcdWriter(settings) as writer:
            writer.put(f"{PREFIX}/a", "1")
        assert any(entry["event"] == "source.auth_without_tls" for entry in logs)
        source = EtcdSource(settings)
        try:
            assert [kv.key for kv in source.read_all().kvs] == [f"{PREFIX}/a"]
        finally:
            source.close()


def test_authentication_fails_over_past_endpoints_that_are_down(
    auth_etcd: EtcdServer, auth_settings: EtcdSettings
) -> None:
    dead = [f"https://127.0.0.1:{free_port()}" for _ in range(2)]
    settings = auth_settings.model_copy(update={"endpoints": [*dead, auth_etcd.endpoint]})
    # pyetcd starts from a random endpoint: several clients make a dead first pick likely.
    for i in range(4):
        with EtcdWriter(settings) as writer:
            writer.put(f"{PREFIX}/k{i}", "1")
            assert writer.endpoint == auth_etcd.endpoint


# --- expired tokens -----------------------------------------------------------------------


@pytest.fixture
def short_token_etcd(tmp_path: Path, tls: TlsFiles) -> Iterator[EtcdServer]:
    """Auth tokens expire one second after their last use (etcd's minimum)."""
    for server in _server(tmp_path, tls=tls, auth_token_ttl=1, log_level="info"):
        server.enable_auth(USER, PASSWORD, PREFIX)
        yield server


def test_an_expired_token_is_replaced_by_authenticating_again(
    short_token_etcd: EtcdServer,
    tls: TlsFiles,
    password_file: Path,
    run_source: Callable[..., RunningSource],
) -> None:
    etcd = short_token_etcd
    proxy = TcpProxy(etcd.client_port, scheme="https")
    direct = etcd_settings(
        etcd.endpoint, user=USER, password_file=password_file, **tls.client_settings()
    )
    try:
        # The writer: its token expires between two calls; the second call still works.
        writer = EtcdWriter(direct)
        writer.put(f"{PREFIX}/a", "1")
        wait_for(lambda: etcd.deleted_tokens(USER) >= 1, what="the writer's token to expire")
        writer.put(f"{PREFIX}/a", "2")

        # read_all on a client whose token has expired starts over with a fresh one.
        reader = EtcdSource(direct)
        assert len(reader.read_all().kvs) == 1
        wait_for(lambda: etcd.deleted_tokens(USER) >= 3, what="the reader's token to expire")
        assert len(reader.read_all().kvs) == 1
        reader.close()

        _watch_outlives_its_token(etcd, proxy, writer, run_source, direct)
        writer.close()
    finally:
        proxy.close()


def _watch_outlives_its_token(
    etcd: EtcdServer,
    proxy: TcpProxy,
    writer: EtcdWriter,
    run_source: Callable[..., RunningSource],
    direct: EtcdSettings,
) -> None:
    """The source's token expires while the watch runs (a watch stream outlives its
    token); after a cut, the resume authenticates again and loses nothing."""
    running = run_source(direct.model_copy(update={"endpoints": [proxy.endpoint]}))
    rec = running.recorder
    wait_for(rec.connected, what="the watch")
    before = etcd.deleted_tokens(USER)
    wait_for(lambda: etcd.deleted_tokens(USER) > before, what="the source's token to expire")
    writer.put(f"{PREFIX}/b", "1")
    wait_for(converged(etcd, rec), what="an event on the watch after its token expired")

    proxy.block()
    wait_for(lambda: not rec.connected(), what="the cut to be noticed")
    writer.put(f"{PREFIX}/c", "1")
    writer.delete(f"{PREFIX}/a")
    proxy.unblock()
    wait_for(converged(etcd, rec), what="convergence after the cut")
    wait_for(rec.connected, what="the watch to be re-established")
    assert len(rec.resets()) == 1, "a resume, not a resync"
    assert rec.errors == []


@pytest.fixture
def plain_short_token_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """Plain HTTP, auth on, tokens expiring one second after their last use."""
    for server in _server(tmp_path, auth_token_ttl=1, log_level="info"):
        server.enable_auth(USER, PASSWORD, PREFIX)
        yield server


def test_an_expired_token_on_the_gateway_is_replaced_by_authenticating_again(
    plain_short_token_etcd: EtcdServer,
    password_file: Path,
    run_source: Callable[..., RunningSource],
) -> None:
    """The JSON gateway with auth (plain HTTP: etcd refuses gateway calls that carry a
    client certificate while auth is on, so TLS + auth goes over gRPC under ``auto``)."""
    etcd = plain_short_token_etcd
    proxy = TcpProxy(etcd.client_port)
    direct = etcd_settings(etcd.endpoint, user=USER, password_file=password_file, transport="http")
    try:
        writer = EtcdWriter(direct)
        writer.put(f"{PREFIX}/a", "1")
        reader = EtcdSource(direct)
        assert len(reader.read_all().kvs) == 1
        before = etcd.deleted_tokens(USER)
        wait_for(lambda: etcd.deleted_tokens(USER) > before, what="the reader's token to expire")
        assert len(reader.read_all().kvs) == 1  # a TokenRejected, then a fresh login
        reader.close()

        _watch_outlives_its_token(etcd, proxy, writer, run_source, direct)
        writer.close()
    finally:
        proxy.close()


def test_stop_is_bounded_while_authentication_hangs(tls_etcd: EtcdServer, tls: TlsFiles) -> None:
    """A stalled server holds ``run()`` in Authenticate at most for the call timeout."""
    tls_etcd.pause()
    try:
        password = tls_etcd.workdir / "pw"
        password.write_text("x")
        settings = etcd_settings(
            tls_etcd.endpoint,
            timeout=2.0,
            user=USER,
            password_file=password,
            **tls.client_settings(),
        )
        source = EtcdSource(settings)
        rec, stop = SourceRecorder(), threading.Event()
        thread = threading.Thread(target=source.run, args=(rec, stop))
        thread.start()
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive(), "run() kept going after stop and a timed-out login"
        source.close()
    finally:
        tls_etcd.resume()
