"""Static checks of what we ship for deployment: compose file, container, systemd unit, docs.

Here the compose file is checked by reading it: its services, volumes, PID sharing, that
every ``lbsync`` command line in it parses with lbsync's own parser, and that the lbsync
config it mounts loads and agrees with the mounts. The same commands are run outside
containers in tests/integration/test_deploy_local.py, and the image and the compose stack
for real, with podman, in tests/integration/test_container.py.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from pydantic import BaseModel

from lbsync import metrics
from lbsync.cli import build_parser, cmd_register, cmd_run
from lbsync.config import CommandTarget, HaproxyTarget, NginxTarget, Settings, TemplateSettings
from lbsync.config_file import load_settings
from lbsync.oneshot import check_config
from lbsync.render import Renderer
from lbsync.testing import snapshot_from
from tests.harness import miniyaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "container" / "Dockerfile"
UNIT = REPO / "deploy" / "systemd" / "lbsync.service"
EXAMPLE = REPO / "deploy" / "lbsync.toml.example"
OPERATIONS = REPO / "docs" / "operations.md"
LBSYNC_IMAGE = "lbsync:dev"


# --- docker-compose.yml ----------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = miniyaml.load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def lbsync_commands(compose: dict[str, Any]) -> dict[str, list[str]]:
    """Service → argv of every service that runs the image's ``lbsync`` entrypoint."""
    return {
        name: svc["command"]
        for name, svc in services(compose).items()
        if svc.get("image") == LBSYNC_IMAGE and "entrypoint" not in svc
    }


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path → (source, read_only) for ``source:target[:ro]`` volume entries."""
    found = {}
    for entry in service.get("volumes", []):
        source, target, *mode = entry.split(":")
        found[target] = (source, mode == ["ro"])
    return found


def source_of(service: dict[str, Any], path: str) -> tuple[str, bool]:
    """The mount a container path lives on (the longest mounted prefix)."""
    candidates = [
        target
        for target in mounts(service)
        if PurePosixPath(path) == PurePosixPath(target)
        or PurePosixPath(target) in PurePosixPath(path).parents
    ]
    assert candidates, f"{path} is not on any mount of {service}"
    return mounts(service)[max(candidates, key=len)]


def test_compose_has_the_services_of_the_story(compose: dict[str, Any]) -> None:
    svc = services(compose)
    assert {"etcd", "nginx", "lbsync"} <= set(svc)
    registers = [name for name in svc if name.endswith("-register")]
    assert 2 <= len(registers) <= 3
    for name in registers:
        assert name.removesuffix("-register") in svc
    assert svc["etcd"]["image"].startswith(("quay.io/coreos/etcd:", "gcr.io/etcd-development/"))


def test_every_image_we_build_builds_from_the_dockerfile(compose: dict[str, Any]) -> None:
    for name, svc in services(compose).items():
        if svc.get("image") == LBSYNC_IMAGE:
            build = svc["build"]
            assert (REPO / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE, name


def test_lbsync_is_a_sidecar_sharing_pid_namespace_and_config(compose: dict[str, Any]) -> None:
    svc = services(compose)
    lbsync, nginx = svc["lbsync"], svc["nginx"]
    assert lbsync["pid"] == "service:nginx"
    assert lbsync["depends_on"]["etcd"]["condition"] == "service_healthy"
    assert lbsync["depends_on"]["nginx"]["condition"] == "service_started"
    settings = compose_settings()
    target = settings.targets[0]
    assert isinstance(target, NginxTarget)
    shared = {
        "template dest": str(target.templates[0].dest.parent),
        "pid file": str(target.pid_file.parent),
        "error log": str(target.error_log.parent) if target.error_log else "",
        "main config": str(target.config),
    }
    for what, path in shared.items():
        lb_source, lb_ro = source_of(lbsync, path)
        nginx_source, _ = source_of(nginx, path)
        assert lb_source == nginx_source, f"{what} ({path}) is not shared"
        if what != "main config":
            assert not lb_ro, f"lbsync needs {what} ({path}) writable"
    assert source_of(lbsync, str(settings.state_dir))[1] is False


def test_every_volume_is_declared_and_every_bind_source_exists(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    used = set()
    for svc in services(compose).values():
        for source, _ in mounts(svc).values():
            if source.startswith("."):
                assert (REPO / source).exists(), source
                assert (REPO / source).resolve().is_relative_to(REPO / "deploy" / "compose")
            else:
                used.add(source)
    assert used == declared


def test_every_lbsync_command_line_parses(compose: dict[str, Any]) -> None:
    commands = lbsync_commands(compose)
    assert set(commands) >= {"lbsync", "web-1-register", "web-2-register"}
    for name, argv in commands.items():
        args = build_parser().parse_args(argv)
        if name == "lbsync":
            assert args.handler is cmd_run
            assert argv == ["run", "-c", "/etc/lbsync/lbsync.toml"]
        else:
            assert args.handler is cmd_register, name


def test_registers_point_at_their_backend_and_etcd(compose: dict[str, Any]) -> None:
    svc = services(compose)
    etcd_command = " ".join(svc["etcd"]["command"])
    for name, argv in lbsync_commands(compose).items():
        if not name.endswith("-register"):
            continue
        backend = name.removesuffix("-register")
        args = build_parser().parse_args(argv)
        assert svc[name]["network_mode"] == f"service:{backend}"
        assert args.host == svc[backend]["hostname"] == backend
        assert args.id == backend
        assert f"http.server {args.port}" in " ".join(svc[backend]["entrypoint"])
        assert args.endpoint == ["http://etcd:2379"]
        assert "--advertise-client-urls=http://etcd:2379" in etcd_command
        assert args.ttl >= 5  # lease keep-alive survives a slow container start


def test_commands_in_the_compose_comments_parse() -> None:
    """The tour at the top of the file uses real commands."""
    lines = [
        line.lstrip("# ").split("#")[0]
        for line in COMPOSE.read_text().splitlines()
        if "exec lbsync lbsync " in line
    ]
    assert lines
    for line in lines:
        argv = shlex.split(line.split("exec lbsync lbsync ", 1)[1])
        build_parser().parse_args(argv)


def compose_settings() -> Settings:
    return load_settings(REPO / "deploy" / "compose" / "lbsync" / "lbsync.toml", environ={})


def test_compose_lbsync_config_loads_and_its_template_compiles() -> None:
    settings = compose_settings()
    assert settings.etcd.endpoints == ["http://etcd:2379"]
    assert settings.http.listen is not None
    renderer = Renderer()
    for target in settings.targets:
        for template in target.templates:
            renderer.load(template.src)


def test_compose_template_renders_a_valid_front_door_with_and_without_instances() -> None:
    settings = compose_settings()
    src = settings.targets[0].templates[0].src
    renderer = Renderer()
    empty = renderer.render(src, snapshot_from({})).decode()
    assert "upstream web {" in empty
    assert "server 127.0.0.1:1 down;" in empty
    assert "listen 8080;" in empty
    catalog = {
        "services": {
            "web": {
                "instances": {
                    "web-1": {"host": "web-1", "port": 8000},
                    "web-2": {"host": "web-2", "port": 8000},
                    "web-3": {"host": "web-3", "port": 8000},
                },
                "health": {"web-2": "down", "web-3": "drain"},
            }
        }
    }
    text = renderer.render(src, snapshot_from(catalog)).decode()
    assert "server web-1:8000 weight=1;" in text
    assert "web-2" not in text
    assert "server web-3:8000 down;" in text
    assert "127.0.0.1:1" not in text


def test_compose_nginx_conf_agrees_with_the_lbsync_target() -> None:
    target = compose_settings().targets[0]
    assert isinstance(target, NginxTarget)
    conf = (REPO / "deploy" / "compose" / "nginx" / "nginx.conf").read_text()
    assert f"pid {target.pid_file};" in conf
    assert f"error_log {target.error_log} " in conf
    assert f"include {target.templates[0].dest.parent}/*.conf;" in conf
    assert "\nuser " not in conf  # runs as the image's non-root user


# --- Dockerfile ------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_dockerfile_lints() -> None:
    instructions = dockerfile_instructions()
    keywords = [k for k, _ in instructions]
    assert keywords[0] == "FROM" or keywords[:2] == ["ARG", "FROM"]
    base = dict(instructions)["FROM"]
    if base == "${BASE_IMAGE}":  # a build argument, defaulting to the image users pull
        default = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M)
        assert default, "BASE_IMAGE has no default"
        base = default.group(1)
    assert base.startswith("python:3.11-slim")
    users = [rest for k, rest in instructions if k == "USER"]
    assert users
    assert users[-1] not in ("root", "0", "0:0")
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    entrypoint = json.loads(dict(instructions)["ENTRYPOINT"])
    assert entrypoint == ["lbsync"]
    cmd = json.loads(dict(instructions)["CMD"])
    assert cmd == ["run", "-c", "/etc/lbsync/lbsync.toml"]
    assert build_parser().parse_args(cmd).handler is cmd_run
    runs = " ".join(rest for k, rest in instructions if k == "RUN")
    assert "pip install" in runs
    assert "apt-get install" in runs
    assert re.search(r'ARG LB_PACKAGES="[^"]*\bnginx\b', DOCKERFILE.read_text())
    assert "rm -rf /var/lib/apt/lists/*" in runs


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for keyword, rest in dockerfile_instructions():
        if keyword != "COPY":
            continue
        *sources, _dest = rest.split()
        for source in sources:
            assert (REPO / source).exists(), source
            assert source.rstrip("/").removeprefix("./") in kept, f"{source} is ignored"


# --- systemd unit ----------------------------------------------------------------------


def read_unit(path: Path) -> configparser.ConfigParser:
    """A systemd unit file as sections of case-sensitive keys."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


@pytest.fixture(scope="module")
def unit() -> configparser.ConfigParser:
    return read_unit(UNIT)


def test_unit_has_the_required_settings(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30s",
        "ExecStart": "/usr/local/bin/lbsync run -c /etc/lbsync/lbsync.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "StateDirectory": "lbsync",
        "User": "lbsync",
    }
    for key, value in expected.items():
        assert service.get(key) == value, key
    assert {"/etc/nginx/conf.d", "/var/lib/lbsync"} <= set(service["ReadWritePaths"].split())
    ambient = set(service["AmbientCapabilities"].split())
    assert "CAP_KILL" in ambient
    assert set(service["CapabilityBoundingSet"].split()) == ambient
    assert "ProtectProc" not in service  # lbsync must see the nginx master and workers
    assert "multi-user.target" in unit["Install"]["WantedBy"].split()


def unit_values(key: str) -> list[str]:
    """Every assignment of ``key`` in the unit, in order (some keys add up, like filters)."""
    prefix = f"{key}="
    return [
        line[len(prefix) :] for line in UNIT.read_text().splitlines() if line.startswith(prefix)
    ]


def test_unit_writes_only_where_lbsync_writes(unit: configparser.ConfigParser) -> None:
    writable = unit["Service"]["ReadWritePaths"].split()
    assert writable == ["/etc/nginx/conf.d", "/var/lib/lbsync", "/var/log/nginx", "-/run/nginx.pid"]
    assert "/run" not in writable  # with CAP_DAC_OVERRIDE that reached all of /run
    # The pid file is a bind mount of one inode: nginx recreates it when it restarts, so
    # lbsync (and its mount namespace) must restart with nginx.
    assert unit["Unit"]["PartOf"] == "nginx.service"
    assert "nginx.service" in unit["Install"]["WantedBy"].split()


def _bytes(size: str) -> int:
    number, unit_letter = re.fullmatch(r"(\d+)([KMG])", size).groups()  # type: ignore[union-attr]
    return int(number) << {"K": 10, "M": 20, "G": 30}[unit_letter]


def test_unit_limits_and_hardening(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    # lbsync's RSS stays under 80 MB at 10,000 instances; the checker runs in the cgroup.
    assert 160 << 20 <= _bytes(service["MemoryHigh"]) < _bytes(service["MemoryMax"]) <= 1 << 30
    assert 64 <= int(service["TasksMax"]) <= 512
    assert service["UMask"] == "0027"
    for key in ("PrivateMounts", "RemoveIPC", "PrivateDevices", "RestrictNamespaces"):
        assert service[key] == "yes", key
    filters = unit_values("SystemCallFilter")
    assert filters[0] == "@system-service"
    assert "~@privileged @resources" in filters
    assert service["SystemCallErrorNumber"] == "EPERM"
    assert service["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    # Each capability is measured in tests/integration/test_deploy_local.py.
    assert set(service["CapabilityBoundingSet"].split()) <= {
        "CAP_KILL",
        "CAP_NET_BIND_SERVICE",
        "CAP_DAC_OVERRIDE",
    }


def test_unit_commands_parse(unit: configparser.ConfigParser) -> None:
    for key in ("ExecStartPre", "ExecStart"):
        binary, *argv = shlex.split(unit["Service"][key])
        assert binary == "/usr/local/bin/lbsync"
        build_parser().parse_args(argv)


def test_unit_writable_paths_cover_the_example_config(unit: configparser.ConfigParser) -> None:
    writable = [Path(p.lstrip("-")) for p in unit["Service"]["ReadWritePaths"].split()]
    settings = load_settings(EXAMPLE, environ={})
    for path in [t.dest for target in settings.targets for t in target.templates]:
        assert any(path.is_relative_to(w) for w in writable), path
    assert settings.state_dir in writable


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def verified_exposure(unit: Path, tmp_path: Path) -> float:
    """``systemd-analyze verify`` passes cleanly on ``unit`` (ExecStart pointed at this
    environment's lbsync, which verify checks exists); its offline exposure score."""
    assert SYSTEMD_ANALYZE is not None
    lbsync = Path(sys.executable).parent / "lbsync"
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/usr/local/bin/lbsync", str(lbsync)))
    verify = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(copy)], capture_output=True, text=True, check=False
    )
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == "", verify.stderr
    security = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=20", str(copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert score is not None, security.stdout[-2000:]
    return float(score.group(1))


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_and_security(tmp_path: Path) -> None:
    # Exposure score (0-100; shown as 0.0-10.0). 2.3 before issue 17, 2.0 since (1.8
    # with the documented drop-in that removes CAP_DAC_OVERRIDE).
    assert verified_exposure(UNIT, tmp_path) <= 2.0


# --- lbsync.toml.example ---------------------------------------------------------------


def test_example_config_loads_and_its_templates_compile(tmp_path: Path) -> None:
    copy = tmp_path / "lbsync.toml"
    shutil.copy(EXAMPLE, copy)
    (tmp_path / "templates").symlink_to(REPO / "templates")
    settings = load_settings(copy, environ={})
    assert check_config(settings)


def _field_names(model: type[BaseModel]) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        names.add(field.alias or name)
    return names


def test_example_config_mentions_every_setting() -> None:
    """Complete: every key of every section and target kind appears, set or commented."""
    text = EXAMPLE.read_text()
    present = set(re.findall(r"^\s*#?\s*([a-z_]+)\s*=", text, flags=re.MULTILINE))
    tables = set(re.findall(r"^\s*#?\s*\[+([a-z_.]+)\]+", text, flags=re.MULTILINE))
    missing: set[str] = set()
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            assert name in tables, f"[{name}] missing"
            missing |= {f"{name}.{key}" for key in _field_names(annotation) - present}
    missing |= {"state_dir"} - present
    for model in (NginxTarget, HaproxyTarget, CommandTarget, TemplateSettings):
        missing |= {
            f"{model.__name__}.{key}"
            for key in _field_names(model) - present - {"template"}  # [[target.template]]
        }
    assert "target.template" in tables
    assert not missing, f"not in {EXAMPLE.name}: {sorted(missing)}"


# --- docs ------------------------------------------------------------------------------


def test_operations_doc_names_every_metric() -> None:
    text = OPERATIONS.read_text()
    names = {
        metric.name + ("_total" if metric.type == "counter" else "")
        for metric in metrics.enable().registry.collect()
        if metric.name.startswith("lbsync_")
    }
    assert names
    missing = sorted(name for name in names if name not in text)
    assert not missing, f"docs/operations.md does not mention {missing}"
