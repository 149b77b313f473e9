"""lbsync's own settings: the schema of lbsync.toml, every section a frozen model.

Reading the file (TOML, ``LBSYNC_*`` environment overrides, relative paths) is
``lbsync.config_file``; ``docs/configuration.md`` is generated from these models
(``scripts/gen_config_docs.py``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lbsync.errors import ConfigError

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
    # The attribute docstrings are the fields' descriptions: scripts/gen_config_docs.py
    # reads them from the source to write docs/configuration.md. pydantic is not asked to
    # (``use_attribute_docstrings``): that re-parsed this file per model, ~25 ms of CPU at
    # every command's start-up, for text only the generator uses.
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class EtcdSettings(Section):
    endpoints: list[str] = ["http://127.0.0.1:2379"]
    """etcd client URLs (`http://host:port`, `https://host:port`, or `host:port`, which
    means TLS when `ca_file` is set); with several, lbsync fails over between them."""
    prefix: str = "/lbsync"
    """The key prefix: services live under `<prefix>/services/...`, and template
    functions (`getv`, `ls`...) see the keys under it. Starts with `/`, does not end
    with one."""
    timeout: Duration = 5.0
    """How long one etcd request may take; also how long `run` waits at start for a
    first read before it falls back to the saved catalog."""
    silence_deadline: Duration = 15.0
    """A watch that delivers neither an event nor a progress notification for this long
    is treated as broken and reconnected (a stalled server otherwise hangs it forever)."""
    transport: Literal["auto", "http", "grpc"] = "auto"
    """How the daemon reads and watches etcd. `auto`: the watch over etcd's JSON gateway
    (`/v3/...` on the client URLs, etcd 3.4+; HTTP/1.1, standard library: an idle daemon
    has one blocked socket and no gRPC threads, ~2 ms of CPU per 10 s instead of ~10-15),
    full reads (start-up, resyncs) over gRPC on a client closed after each (etcd's JSON is
    ~4x slower to produce: +0.1 s at 10,000 keys, +1 s at 100,000); an endpoint that does
    not serve the gateway (etcd's gRPC proxy; etcd with auth and a client certificate) is
    used over gRPC alone; `source.transport` logs the choice. `http`: the gateway for reads
    too, gRPC never loaded (slower full reads). `grpc`: gRPC for everything, with keepalive
    pings and progress requests (more idle CPU). Writes (`register`, `mark`) use gRPC."""
    ca_file: Path | None = Field(default=None, examples=["/etc/lbsync/etcd-ca.pem"])
    """PEM file of the CA that signed the etcd servers' certificates; setting it turns
    on TLS for endpoints written without a scheme."""
    cert_file: Path | None = Field(default=None, examples=["/etc/lbsync/etcd-client.pem"])
    """Client certificate (PEM) for TLS client authentication; goes with `key_file`."""
    key_file: Path | None = Field(default=None, examples=["/etc/lbsync/etcd-client-key.pem"])
    """Private key (PEM) of `cert_file`."""
    user: str | None = Field(default=None, examples=["lbsync"])
    """etcd user name for password authentication; goes with `password_file`."""
    password_file: Path | None = Field(default=None, examples=["/etc/lbsync/etcd-password"])
    """File holding the etcd password (one line), so that it appears neither in the
    config file nor in the environment."""

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
    """Quiescence: a round starts once changes have stopped for this long..."""
    max: Duration = 1.0
    """...but never later than this after the first change of a burst."""
    min_interval: Duration = 0.0
    """At least this long between the starts of two rounds."""

    @model_validator(mode="after")
    def _min_not_above_max(self) -> WaitSettings:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}s) is longer than max ({self.max}s)")
        return self


class TemplateSettings(Section):
    src: Path = Field(examples=["templates/nginx/upstreams.conf.j2"])
    """The Jinja2 template (relative paths: against the config file's directory);
    `{% include %}` and `{% import %}` resolve next to it."""
    dest: Path = Field(examples=["/etc/nginx/conf.d/lbsync-upstreams.conf"])
    """Where the rendered file goes (absolute): written atomically, only when its bytes
    change, after the target's whole config passed the check."""
    mode: int | None = Field(default=None, examples=[0o644])
    """File mode of `dest`, usually written in octal (`mode = 0o644`, which TOML reads as
    420); unset keeps the existing file's mode."""
    follow_symlinks: bool = False
    """A `dest` that is a symlink is refused (the round fails, nothing is written) unless
    this is set: then the file it leads to is replaced, in its own directory (README,
    "Files")."""

    @field_validator("dest")
    @classmethod
    def _dest_is_absolute(cls, dest: Path) -> Path:
        if not dest.is_absolute():
            raise ValueError(f"dest must be an absolute path, got {str(dest)!r}")
        return dest


Command = Annotated[list[str], BeforeValidator(lambda v: v.split() if isinstance(v, str) else v)]


class TargetBase(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", examples=["web-lb"])
    """The target's name, unique in the file: in logs, metrics and `--target`."""
    templates: list[TemplateSettings] = Field(alias="template", min_length=1)
    """The files this target renders (`[[target.template]]`, at least one); one round
    reloads the target at most once, however many of them changed."""
    command_timeout: Duration = 30.0
    """Time limit for each command lbsync runs for this target (config check, reload
    command)."""
    verify_timeout: Duration = 10.0
    """After a reload, how long the LB has to show that it took the new config before
    lbsync restores the last-known-good files (nginx, haproxy; a command target's
    verdict is its reload command's exit status)."""
    max_render_bytes: int = Field(default=64 * 2**20, ge=1024)
    """A render past this many bytes (all of the target's files together) fails before
    staging: a value must not be able to fill the disk or stall the checker. 10,000
    servers render to ~1 MiB, so the default leaves 64x headroom."""


class NginxTarget(TargetBase):
    driver: Literal["nginx"]
    """Selects the nginx driver: `nginx -t` on the staged tree, SIGHUP to the master,
    new workers confirmed from `/proc`."""
    config: Path = Path("/etc/nginx/nginx.conf")
    """nginx's main config: the whole tree it includes is validated, with this target's
    rendered files in place."""
    pid_file: Path = Path("/run/nginx.pid")
    """The pid file of the nginx master that gets the SIGHUP."""
    binary: str = "nginx"
    """The nginx executable, for `nginx -t`."""
    prefix: Path | None = Field(default=None, examples=["/etc/nginx"])
    """nginx's `-p`: where relative paths in nginx.conf (logs, pid) resolve; unset:
    nginx's built-in prefix."""
    error_log: Path | None = Field(default=None, examples=["/var/log/nginx/error.log"])
    """nginx's error log: an `[emerg]` logged there after the signal fails the reload
    at once instead of after `verify_timeout`."""
    runtime: bool = False
    """Runtime mode (docs/nginx-runtime.md): membership changes go to a Lua balancer
    through a loopback control endpoint, with no reload; needs nginx's Lua module."""
    control_url: str = "http://127.0.0.1:8089/lbsync/"
    """Runtime mode: the control location, as lbsync reaches it and as the template
    renders it (plain http, a loopback IP, a port, a path ending in `/`)."""
    control_timeout: Duration = 2.0
    """Runtime mode: time limit for one request to the control endpoint."""
    poll_interval: Duration = 1.0
    """Runtime mode: how often lbsync asks nginx which peer lists it holds (to notice a
    restart)."""
    lua_dir: Path | None = Field(default=None, examples=["/usr/share/lbsync/lua"])
    """Runtime mode: where nginx loads lbsync's Lua module from (absolute); unset: the
    copy shipped in the package."""
    luajit: str = "luajit"
    """The LuaJIT interpreter that checks Lua in rendered files before a reload (`nginx
    -t` never runs Lua; Debian: package luajit2)."""
    control_token_file: Path = Path("/var/lib/lbsync/nginx-control.token")
    """Runtime mode: the control endpoint's secret. lbsync creates it (0600) if missing
    and refuses a symlink, another owner or a mode wider than 0640; nginx's master reads
    it at every config load (docs/nginx-runtime.md, "Authentication")."""

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

    @field_validator("control_token_file")
    @classmethod
    def _token_file_is_absolute(cls, path: Path) -> Path:
        if not path.is_absolute() or not _SAFE_PATH.fullmatch(str(path)):
            raise ValueError(
                f"control_token_file must be an absolute path without quotes, got {str(path)!r}"
            )
        return path


_CONTROL_URL = re.compile(
    r"^http://(127(?:\.(?:25[0-5]|2[0-4]\d|1?\d?\d)){3}|\[::1\]):"
    r"([1-9]\d{0,3}|[1-5]\d{4}|6[0-4]\d{3}|65[0-4]\d{2}|655[0-2]\d|6553[0-5])"
    r"(/(?:[A-Za-z0-9_.-]+/)*)$"
)
_SAFE_PATH = re.compile(r"^[^\"'\\;{}\s$]+$")


class HaproxyTarget(TargetBase):
    driver: Literal["haproxy"]
    """Selects the HAProxy driver (docs/haproxy.md): `haproxy -c` on the staged config,
    master-worker reload, membership changes over the runtime API."""
    config: Path = Path("/etc/haproxy/haproxy.cfg")
    """HAProxy's config file, validated as a whole with this target's rendered files in
    place (also read at start to keep the server slots of a previous run)."""
    pid_file: Path = Path("/run/haproxy.pid")
    """The pid file of the HAProxy master (`haproxy -W -p`): SIGUSR2 reloads it."""
    binary: str = "haproxy"
    """The HAProxy executable, for `haproxy -c`."""
    master_socket: Path | None = Field(default=None, examples=["/run/haproxy/master.sock"])
    """The master CLI socket (`haproxy -W -S <path>`): `show proc` confirms reloads,
    and a master that is not a local process (a sidecar) is reloaded through it."""
    admin_socket: Path | None = Field(default=None, examples=["/run/haproxy/admin.sock"])
    """The runtime API socket (`stats socket ... level admin`), for membership changes
    without a reload; templates get it as `admin_socket`."""
    runtime: bool = True
    """Apply membership-only changes over `admin_socket` instead of reloading (needs
    `admin_socket`)."""
    state_file: Path | None = Field(default=None, examples=["/var/lib/haproxy/server-state"])
    """HAProxy's `server-state-file`: saved before each reload so servers keep their
    state across it; templates get it as `state_file`."""
    runtime_check_slots: int = Field(default=512, ge=1)
    """Runtime mode's reconcile tick reads the servers of this many slots in full, backend
    by backend in turn (docs/haproxy.md), besides every backend whose summary moved: a
    change the summaries cannot show (an address) is seen within ceil(all slots / this)
    ticks. Higher: seen sooner, for more CPU per tick."""


class CommandTarget(TargetBase):
    driver: Literal["command"]
    """Selects the command driver, confd-style, for any other program: a check command
    on the staged files, then a reload command."""
    config: Path | None = Field(default=None, examples=["/etc/mylb/mylb.conf"])
    """The program's main config, when the rendered files are parts of a larger tree
    that must be staged and checked as a whole."""
    check_command: Command | None = Field(default=None, examples=[["mylb", "--check", "{staged}"]])
    """Validates the staged files before they replace the live ones; a non-zero exit
    refuses the change. `{staged}`: the staged copy of the first template's file;
    `{staged_root}`: the staged tree. Unset: no check."""
    reload_command: Command = Field(examples=[["systemctl", "reload", "mylb"]])
    """Run after the files are swapped in; a non-zero exit restores the last-known-good
    files."""
    shell: bool = False
    """Run the commands through `/bin/sh -c` (placeholders shell-quoted) instead of
    directly."""


Target = Annotated[NginxTarget | HaproxyTarget | CommandTarget, Field(discriminator="driver")]


class RenderSettings(Section):
    sandbox: bool = False
    """Render in Jinja2's SandboxedEnvironment (about 7x slower), for template
    repositories shared with people who must not run code as lbsync."""


class GuardSettings(Section):
    """Per service: hold an update that would take too much of it out of rotation at once
    (lbsync/guard.py); the other services' changes apply meanwhile."""

    max_removed_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    """Hold an update that would take more than this fraction of a service's instances
    out of rotation at once (a monitoring outage, a wiped prefix)."""
    min_removed: int = Field(default=2, ge=1)
    """Fewer removals than this never trip the fraction rule: instances die one at a time
    in normal life; the guard is for mass removals."""
    min_instances: dict[str, int] = Field(default={}, examples=[{"web": 2, "api": 3}])
    """Per service: hold an update that would leave fewer usable instances than this."""
    hold: Duration = 30.0
    """A service's held update is applied anyway once it has persisted this long (or at
    once with `lbsync confirm --service NAME`, or `lbsync confirm` for every hold). An
    empty catalog is never applied by time: only `lbsync confirm` applies it."""


class ReconcileSettings(Section):
    """Level-triggered reconciliation: compare what lbsync applied with what is live, and
    retry failed rounds without waiting for an etcd change (docs/failure-modes.md)."""

    interval: Duration = Field(default=10.0, gt=0)
    """How often the live files (and the LB's process identity) are compared with what
    lbsync last applied; a difference is repaired through the normal path. A comparison
    that finds nothing costs a few `stat` calls: no checker run, no write, no reload."""
    retry_initial: Duration = Field(default=1.0, gt=0)
    """A failed round (checker refused, reload or verify failed, LB unreachable) is tried
    again after this long, with jitter, without waiting for an etcd change ..."""
    retry_max: Duration = Field(default=60.0, gt=0)
    """... the delay doubling after each failure up to this; a new etcd change starts
    over from `retry_initial`."""


class HttpSettings(Section):
    listen: str | None = Field(default=None, examples=["127.0.0.1:9274"])
    """`address:port` to serve on; off when unset. It has no authentication: keep it on
    loopback or a management network."""
    max_staleness: Duration = 300.0
    """/readyz fails once etcd has been unreachable (or the saved catalog is) this
    stale."""


class CheckSettings(Section):
    """One active health check (HAProxy's rise/fall meaning)."""

    type: Literal["http", "tcp"] = "http"
    """`http`: a request must get an expected status (and body); `tcp`: a connect must
    succeed."""
    method: Literal["GET", "HEAD"] = "GET"
    """HTTP method of an `http` check."""
    path: str = Field(default="/", pattern=r"/[A-Za-z0-9_.~!$&'()*+,;=:@%/?-]{0,255}")
    """Path (and query) an `http` check requests."""
    status_min: int = Field(default=200, ge=100, le=599)
    """Lowest HTTP status that counts as healthy."""
    status_max: int = Field(default=399, ge=100, le=599)
    """Highest HTTP status that counts as healthy."""
    host: str | None = Field(default=None, examples=["web.example.com"])
    """Host header of an `http` check; the instance's address when unset."""
    body_contains: str | None = Field(default=None, examples=["OK"])
    """An `http` check also fails unless the body contains this text (the first 64 KiB
    are read)."""
    interval: Duration = 5.0
    """Time between two checks of one instance."""
    timeout: Duration = 2.0
    """A check not answered within this long fails."""
    rise: int = Field(default=2, ge=1, le=100)
    """Consecutive successes that bring a down instance back up."""
    fall: int = Field(default=3, ge=1, le=100)
    """Consecutive failures that take an up instance down."""
    jitter: float = Field(default=0.1, ge=0.0, le=1.0)
    """Each wait between checks is shortened at random by up to this fraction of
    `interval` (never lengthened, so `fall` failures are seen within `fall` x `interval`),
    so thousands of checks do not fire together."""

    @model_validator(mode="after")
    def _status_range(self) -> CheckSettings:
        if self.status_min > self.status_max:
            raise ValueError(f"status_min {self.status_min} is above status_max {self.status_max}")
        return self


class ProbeSettings(Section):
    """`lbsync probe` (active health checks) and how the daemon combines their verdicts."""

    name: str | None = Field(
        default=None, pattern=r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}", examples=["lb-1"]
    )
    """This prober's name in `probes/<id>/<name>` keys; the host name when unset. Each
    prober needs its own."""
    check: CheckSettings = CheckSettings()
    """The check of every service that has none in `services`."""
    services: dict[str, CheckSettings] = Field(
        default={}, examples=[{"api": {"type": "tcp", "interval": "2s"}}]
    )
    """Per service: its own check (keys not given take the built-in defaults, not those of
    `[probe.check]`)."""
    all_services: bool = True
    """Probe every registered service (with `check` unless it is in `services`); when
    false, only the services named in `services`."""
    lease_ttl: Duration = 10.0
    """TTL of the prober's etcd lease: a dead prober's verdicts disappear this long after
    it stops."""
    max_connections: int = Field(default=256, ge=1, le=100_000)
    """Checks in flight at once; the rest wait for a free slot."""
    listen: str | None = Field(default=None, examples=["127.0.0.1:9275"])
    """`address:port` of the prober's /metrics and /healthz; off when unset."""
    quorum: int | None = Field(default=None, ge=1, examples=[2])
    """(daemon) Probers that must say down to take an instance out; a majority of the live
    probers reporting on it when unset (a single prober is its own majority)."""
    panic_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    """(daemon) When probes would take more than this fraction of a service's registered-up
    instances out, probe verdicts are ignored for that service (`probe.panic`); 1.0 turns
    panic off."""


class Settings(Section):
    etcd: EtcdSettings = EtcdSettings()
    """Where the catalog lives: the etcd cluster and the key prefix lbsync watches."""
    wait: WaitSettings = WaitSettings()
    """How a burst of etcd changes is coalesced into one render-and-reload round."""
    render: RenderSettings = RenderSettings()
    """How templates are rendered (docs/templates.md)."""
    guard: GuardSettings = GuardSettings()
    """Per service: hold an update that would take too much of it out of rotation at once."""
    reconcile: ReconcileSettings = ReconcileSettings()
    """Drift repair and retries of failed rounds."""
    http: HttpSettings = HttpSettings()
    """lbsync's own HTTP endpoint: /metrics, /healthz, /readyz, /status."""
    probe: ProbeSettings = ProbeSettings()
    """Active health checks: `lbsync probe`, and the quorum and panic threshold the daemon
    applies to their verdicts (docs/health-checks.md)."""
    state_dir: Path = Path("/var/lib/lbsync")
    """lbsync's own directory: staging trees, last-known-good copies, the saved catalog;
    one daemon per directory."""
    targets: list[Target] = Field(default=[], alias="target")
    """The load balancers (or other programs) lbsync drives on this host, each a
    `[[target]]` with its `driver`; at least one (`lbsync probe` alone needs none)."""
    # Where the file came from, for messages; not part of the file.
    source_path: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _unique_names_and_dests(self, info: ValidationInfo) -> Settings:
        if not self.targets and not (info.context or {}).get("targets_optional"):
            raise ValueError("no [[target]]: lbsync needs at least one load balancer to drive")
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
