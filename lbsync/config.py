"""lbsync's own settings: a TOML file, overridden by ``LBSYNC_*`` environment variables.

Environment overrides use ``__`` to step into tables: ``LBSYNC_ETCD__PREFIX=/other`` sets
``[etcd] prefix``; a value that parses as JSON (``["http://a:2379"]``, ``true``, ``5``) is
taken as that JSON, anything else as a string. Arrays of tables (``[[target]]``) are not
reachable from the environment on purpose: they belong in the file.

Relative paths in the file (template ``src``, ``state_dir``, files of ``[etcd]``) are
resolved against the directory of the config file, so a config works from any cwd.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lbsync.errors import ConfigError

ENV_PREFIX = "LBSYNC_"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """``"50ms"``, ``"1.5s"``, ``"2m"``, ``"1h"`` or a bare number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '50ms' or '2s', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(f"expected a duration like '50ms' or '2s', got {value!r}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class EtcdSettings(Section):
    endpoints: list[str] = ["http://127.0.0.1:2379"]
    prefix: str = "/lbsync"
    timeout: Duration = 5.0
    # A watch that delivers neither an event nor a progress notification for this long
    # is treated as broken and reconnected (a stalled server otherwise hangs it forever).
    silence_deadline: Duration = 15.0
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    user: str | None = None
    password_file: Path | None = None

    @field_validator("endpoints")
    @classmethod
    def _endpoints_are_urls(cls, endpoints: list[str]) -> list[str]:
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        for url in endpoints:
            if not re.match(r"^(https?://)?[^/\s:]+(:\d{1,5})?/?$", url):
                raise ValueError(f"{url!r} is not an endpoint like 'http://127.0.0.1:2379'")
        return endpoints

    @field_validator("prefix")
    @classmethod
    def _prefix_is_absolute(cls, prefix: str) -> str:
        if not prefix.startswith("/") or (prefix.endswith("/") and prefix != "/"):
            raise ValueError(f"{prefix!r} must start with '/' and not end with one")
        return prefix

    @model_validator(mode="after")
    def _auth_is_complete(self) -> EtcdSettings:
        if (self.user is None) != (self.password_file is None):
            raise ValueError("user and password_file go together")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class WaitSettings(Section):
    min: Duration = 0.05
    max: Duration = 1.0
    min_interval: Duration = 0.0

    @model_validator(mode="after")
    def _min_not_above_max(self) -> WaitSettings:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}s) is longer than max ({self.max}s)")
        return self


class TemplateSettings(Section):
    src: Path
    dest: Path
    mode: int | None = None

    @field_validator("dest")
    @classmethod
    def _dest_is_absolute(cls, dest: Path) -> Path:
        if not dest.is_absolute():
            raise ValueError(f"dest must be an absolute path, got {str(dest)!r}")
        return dest


Command = Annotated[list[str], BeforeValidator(lambda v: v.split() if isinstance(v, str) else v)]


class TargetBase(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    templates: list[TemplateSettings] = Field(alias="template", min_length=1)
    command_timeout: Duration = 30.0
    verify_timeout: Duration = 10.0
    # A render past this many bytes (all of the target's files) fails before staging: a
    # value must not be able to fill the disk or stall the checker. 10,000 servers render
    # to ~1 MiB, so the default leaves 64x headroom.
    max_render_bytes: int = Field(default=64 * 2**20, ge=1024)


class NginxTarget(TargetBase):
    driver: Literal["nginx"]
    config: Path = Path("/etc/nginx/nginx.conf")
    pid_file: Path = Path("/run/nginx.pid")
    binary: str = "nginx"
    # nginx's -p: where relative paths in nginx.conf (logs, pid) resolve. None = built-in.
    prefix: Path | None = None
    error_log: Path | None = None
    # Runtime mode (docs/nginx-runtime.md): membership changes go to a Lua balancer through
    # a loopback control endpoint, with no reload; needs nginx's Lua module.
    runtime: bool = False
    # The control location, as lbsync reaches it and as the template renders it.
    control_url: str = "http://127.0.0.1:8089/lbsync/"
    control_timeout: Duration = 2.0
    # How often lbsync asks nginx which peer lists it holds (to notice a restart).
    poll_interval: Duration = 1.0
    # Where nginx loads lbsync's Lua module from (None: the copy shipped in the package).
    lua_dir: Path | None = None
    # The LuaJIT interpreter used to check Lua before a reload (Debian: package luajit2).
    luajit: str = "luajit"

    @field_validator("control_url")
    @classmethod
    def _control_url_is_loopback(cls, url: str) -> str:
        if not _CONTROL_URL.match(url):
            raise ValueError(
                f"{url!r} must look like 'http://127.0.0.1:8089/lbsync/': plain http, a "
                "loopback IP (127.x.x.x or [::1]), a port and a path ending in '/'"
            )
        return url

    @field_validator("lua_dir")
    @classmethod
    def _lua_dir_is_absolute(cls, path: Path | None) -> Path | None:
        if path is not None and (not path.is_absolute() or not _SAFE_PATH.match(str(path))):
            raise ValueError(f"lua_dir must be an absolute path without quotes, got {str(path)!r}")
        return path


_CONTROL_URL = re.compile(
    r"^http://(127(?:\.(?:25[0-5]|2[0-4]\d|1?\d?\d)){3}|\[::1\]):"
    r"([1-9]\d{0,3}|[1-5]\d{4}|6[0-4]\d{3}|65[0-4]\d{2}|655[0-2]\d|6553[0-5])"
    r"(/(?:[A-Za-z0-9_.-]+/)*)$"
)
_SAFE_PATH = re.compile(r"^[^\"'\\;{}\s$]+$")


class HaproxyTarget(TargetBase):
    driver: Literal["haproxy"]
    config: Path = Path("/etc/haproxy/haproxy.cfg")
    pid_file: Path = Path("/run/haproxy.pid")
    binary: str = "haproxy"
    master_socket: Path | None = None
    admin_socket: Path | None = None
    runtime: bool = True
    state_file: Path | None = None


class CommandTarget(TargetBase):
    driver: Literal["command"]
    config: Path | None = None
    check_command: Command | None = None
    reload_command: Command
    shell: bool = False


Target = Annotated[NginxTarget | HaproxyTarget | CommandTarget, Field(discriminator="driver")]


class RenderSettings(Section):
    sandbox: bool = False


class GuardSettings(Section):
    """Hold updates that would take too much out of rotation at once (see scheduler.Guard)."""

    max_removed_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    # Fewer removals than this never trip the fraction rule: instances die one at a time
    # in normal life; the guard is for mass removals.
    min_removed: int = Field(default=2, ge=1)
    min_instances: dict[str, int] = {}
    hold: Duration = 30.0


class HttpSettings(Section):
    listen: str | None = None  # e.g. "127.0.0.1:9274"; off when unset
    # /readyz fails once etcd has been unreachable (or the saved catalog is) this stale.
    max_staleness: Duration = 300.0


class Settings(Section):
    etcd: EtcdSettings = EtcdSettings()
    wait: WaitSettings = WaitSettings()
    render: RenderSettings = RenderSettings()
    guard: GuardSettings = GuardSettings()
    http: HttpSettings = HttpSettings()
    state_dir: Path = Path("/var/lib/lbsync")
    targets: list[Target] = Field(alias="target", min_length=1)
    # Where the file came from, for messages; not part of the file.
    source_path: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _unique_names_and_dests(self) -> Settings:
        names = [t.name for t in self.targets]
        if dup := _first_duplicate(names):
            raise ValueError(f"two targets are named {dup!r}")
        dests = [str(t.dest) for target in self.targets for t in target.templates]
        if dup := _first_duplicate(dests):
            raise ValueError(f"two templates write the same dest {dup!r}")
        return self

    def target(self, name: str) -> Target:
        for target in self.targets:
            if target.name == name:
                return target
        known = ", ".join(t.name for t in self.targets)
        raise ConfigError(f"no target named {name!r} (known: {known})", path=self._where())

    def _where(self) -> str | None:
        return str(self.source_path) if self.source_path else None


def _first_duplicate(items: list[str]) -> str | None:
    seen: set[str] = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def load_settings(path: Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, merge with the environment, resolve relative paths, validate. Raises ConfigError."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError("no such file", path=str(path)) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=str(path)) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=str(path)) from exc
    apply_env_overrides(data, os.environ if environ is None else environ)
    return settings_from_dict(data, base_dir=path.resolve().parent, source=str(path))


def settings_from_dict(data: dict[str, Any], *, base_dir: Path, source: str) -> Settings:
    """Validate a parsed config; ``source`` names it in messages."""
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc, data, source) from exc
    return _resolve_paths(settings, base_dir).model_copy(update={"source_path": Path(source)})


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == f"{ENV_PREFIX}CONFIG":
            continue
        steps = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        table = data
        for step in steps[:-1]:
            child = table.setdefault(step, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"{name} steps into {step!r}, which is not a table", field=".".join(steps)
                )
            table = child
        table[steps[-1]] = _env_value(raw)


def _env_value(raw: str) -> object:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    def absolute(path: Path | None) -> Path | None:
        return None if path is None or path.is_absolute() else base / path

    etcd = settings.etcd.model_copy(
        update={
            name: absolute(getattr(settings.etcd, name)) or getattr(settings.etcd, name)
            for name in ("ca_file", "cert_file", "key_file", "password_file")
        }
    )
    targets = [
        target.model_copy(
            update={
                "templates": [
                    t.model_copy(update={"src": absolute(t.src) or t.src}) for t in target.templates
                ]
            }
        )
        for target in settings.targets
    ]
    return settings.model_copy(
        update={
            "etcd": etcd,
            "targets": targets,
            "state_dir": absolute(settings.state_dir) or settings.state_dir,
        }
    )


def _config_error(exc: ValidationError, data: dict[str, Any], source: str) -> ConfigError:
    """Turn pydantic's report into one message naming field, value and file."""
    lines = []
    for err in exc.errors():
        field = _field_name(err["loc"], data)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            lines.append(f"{field}: missing")
        elif err["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown setting")
        elif (
            "input" in err
            and not isinstance(err["input"], dict | list)
            and repr(err["input"]) not in message
        ):
            lines.append(f"{field}: {message} (got {err['input']!r})")
        else:
            lines.append(f"{field}: {message}")
    first, *rest = lines
    return ConfigError("\n  ".join([first, *rest]), path=source)


def _field_name(loc: tuple[int | str, ...], data: dict[str, Any]) -> str:
    """``('target', 0, 'nginx', 'pid_file')`` → ``target[0] (name='web').pid_file``."""
    parts: list[str] = []
    node: object = data
    for step in loc:
        if isinstance(step, int):
            label = f"[{step}]"
            node = node[step] if isinstance(node, list) and step < len(node) else None
            if isinstance(node, dict) and "name" in node:
                label += f" (name={node['name']!r})"
            parts.append(label)
        elif isinstance(node, dict) and step in node:
            node = node[step]
            parts.append(f".{step}")
        elif step in ("nginx", "haproxy", "command"):
            continue  # the discriminator's own level adds nothing for a reader
        else:
            node = None
            parts.append(f".{step}")
    return "".join(parts).lstrip(".") or "(top level)"
