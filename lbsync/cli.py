"""The ``lbsync`` command: parse, build settings, call the library, map errors to exit codes.

Exit codes: 0 ok (for ``render --dry-run``: no change), 1 error, 2 changes pending
(``render --dry-run`` only, like ``terraform plan -detailed-exitcode``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import types
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lbsync import __version__
from lbsync.errors import ConfigError, LbsyncError

if TYPE_CHECKING:
    from lbsync.config import EtcdSettings, Settings

# Each command imports what it uses inside its handler: `lbsync --version` loads neither
# pydantic nor structlog, `mark` and `status` no jinja2, only `run` metrics (docs/benchmarks.md,
# "Issue 15 — startup"; tests/unit/test_cli_imports.py keeps it so).

# lbsync.model.State's values, written out so that building the parser imports no pydantic
# model (tests/unit/test_cli.py checks that they stay the same).
MARK_STATES = ("up", "drain", "down")

EXIT_OK, EXIT_ERROR, EXIT_PENDING = 0, 1, 2
DEFAULT_CONFIG = "/etc/lbsync/lbsync.toml"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.handler is cmd_run:
        from lbsync import memory

        # no cyclic collections until the first round is applied (settle), from before
        # structlog is imported on (its collections: ~2.5 ms of start-up)
        memory.hold()
    _without_pydantic_plugins()
    try:
        from lbsync.logging import configure_logging

        configure_logging(args.log_level, args.log_format)
        return int(args.handler(args))
    except LbsyncError as err:
        print(f"lbsync: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


def _without_pydantic_plugins() -> None:
    """Let pydantic load no plugins in lbsync's own process.

    At its first model build pydantic looks for plugins (entry points of the group
    ``pydantic``): its loader imports importlib.metadata (with email, zipfile, csv: ~11 ms
    of every command's start) and reads every installed distribution's metadata (~2 ms).
    lbsync has no use for plugins, and a plugin is another package's code running on every
    validation of what was read from etcd. ``PYDANTIC_DISABLE_PLUGINS`` (pydantic's own
    switch) skips the scan but not the import, and as an environment variable it would be
    inherited by the reload and check commands lbsync starts: an empty loader takes the
    loader module's place instead, unless pydantic has already imported it. Only the
    command does this, never ``import lbsync``: a program that imports lbsync keeps its
    plugins.
    """
    name = "pydantic.plugin._loader"
    if name not in sys.modules:
        loader = types.ModuleType(name, "No pydantic plugins in lbsync's process (lbsync.cli).")
        loader.get_plugins = lambda: ()  # type: ignore[attr-defined]
        sys.modules[name] = loader


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbsync", description="Keep nginx/HAProxy in step with instances registered in etcd."
    )
    parser.add_argument("--version", action="version", version=f"lbsync {__version__}")
    parser.set_defaults(handler=lambda _args: _usage(parser))
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        type=Path,
        default=Path(os.environ.get("LBSYNC_CONFIG", DEFAULT_CONFIG)),
        help=f"lbsync.toml (default: $LBSYNC_CONFIG or {DEFAULT_CONFIG})",
    )
    common.add_argument("--log-level", default="info", help="debug, info, warning, error")
    common.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run the daemon")
    run.set_defaults(handler=cmd_run)

    render = sub.add_parser("render", parents=[common], help="render once (dry-run or apply)")
    mode = render.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--dry-run",
        action="store_true",
        help="render + validate in a staging dir, print the diff; exit 0 no change, 2 pending",
    )
    mode.add_argument("--once", action="store_true", help="one full apply, then exit")
    render.add_argument("--target", action="append", default=[], help="only this target")
    render.set_defaults(handler=cmd_render)

    check = sub.add_parser("check", parents=[common], help="validate lbsync's config + templates")
    check.set_defaults(handler=cmd_check)

    confirm = sub.add_parser(
        "confirm", parents=[common], help="apply the updates the running daemon's guard holds"
    )
    confirm.add_argument(
        "--service",
        help="release only this service's hold (default: every hold, and an empty catalog)",
    )
    confirm.set_defaults(handler=cmd_confirm)

    etcd = argparse.ArgumentParser(add_help=False, parents=[common])
    etcd.add_argument(
        "--endpoint",
        action="append",
        default=[],
        help="etcd endpoint (repeatable); default: [etcd] of the config file if there is one",
    )
    etcd.add_argument("--prefix", help="key prefix; default: the config file's, or /lbsync")

    register = sub.add_parser(
        "register", parents=[etcd], help="register an instance under a lease and keep it alive"
    )
    register.add_argument("--service", required=True)
    register.add_argument("--id", required=True)
    register.add_argument("--host", required=True)
    register.add_argument("--port", required=True, type=int)
    register.add_argument("--weight", type=int, default=1)
    register.add_argument("--ttl", type=parse_duration, default=10.0, help="lease TTL (10s)")
    register.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE")
    register.set_defaults(handler=cmd_register)

    mark = sub.add_parser("mark", parents=[etcd], help="mark an instance down, drain or up")
    mark.add_argument("service")
    mark.add_argument("id")
    mark.add_argument("state", choices=MARK_STATES)
    mark.add_argument("--reason", default="")
    mark.add_argument("--by", default="lbsync mark")
    mark.set_defaults(handler=cmd_mark)

    status = sub.add_parser(
        "status", parents=[etcd], help="instances, health marks and states from etcd; daemon state"
    )
    status.add_argument("--json", action="store_true", help="print one JSON document")
    status.add_argument(
        "--http", metavar="HOST:PORT", help="the daemon's [http] listen (default: the config's)"
    )
    status.set_defaults(handler=cmd_status)

    probe = sub.add_parser(
        "probe", parents=[common], help="run active health checks, write verdicts to etcd"
    )
    probe.set_defaults(handler=cmd_probe)

    _add_migrate_confd(sub)
    return parser


def _add_migrate_confd(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate = sub.add_parser(
        "migrate-confd", help="convert confd's resources and Go templates to lbsync"
    )
    migrate.add_argument("--log-level", default="info", help="debug, info, warning, error")
    migrate.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    migrate.add_argument("--confdir", type=Path, required=True, help="confd's confdir")
    migrate.add_argument(
        "--config", type=Path, help="confd.toml (default: CONFDIR/confd.toml if it exists)"
    )
    migrate.add_argument("--out", type=Path, required=True, help="a fresh directory to write")
    migrate.add_argument(
        "--check",
        action="store_true",
        help="then render through etcd and diff against the files confd wrote; exit 2 if any",
    )
    migrate.set_defaults(handler=cmd_migrate_confd)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_ERROR


def parse_duration(text: str) -> float:
    """``config.parse_duration``, loaded when ``--ttl`` is given, not to build the parser
    (same name: argparse's "invalid parse_duration value" stays as it was)."""
    from lbsync import config

    return config.parse_duration(text)


def _settings(args: argparse.Namespace) -> Settings:
    from lbsync.config_file import load_settings

    return load_settings(args.config)


def _etcd_settings(args: argparse.Namespace) -> EtcdSettings:
    """[etcd] from the config file if it exists, then --endpoint/--prefix on top."""
    from pydantic import ValidationError

    from lbsync.config import EtcdSettings
    from lbsync.config_file import load_settings

    exists = args.config.exists()
    base = load_settings(args.config, targets_optional=True).etcd if exists else EtcdSettings()
    update: dict[str, object] = {}
    if args.endpoint:
        update["endpoints"] = args.endpoint
    if args.prefix:
        update["prefix"] = args.prefix
    try:
        return EtcdSettings.model_validate({**base.model_dump(), **update})
    except ValidationError as exc:
        raise ConfigError(str(exc.errors()[0]["msg"]), field="etcd") from exc


def cmd_run(args: argparse.Namespace) -> int:
    from lbsync import state_lock
    from lbsync.source.etcd import EtcdSource
    from lbsync.source.runner import SourceRunner
    from lbsync.state_dir import prepare_state_dir

    settings = _settings(args)
    prepare_state_dir(settings)
    # The first read of etcd (etcd's work, in another process) runs while this process
    # imports the rest of the daemon (pipelines, renderer, drivers: ~40 ms of CPU), not
    # after it; a second lbsync on this state_dir exits before it reads anything.
    lock = state_lock.acquire(settings.state_dir, args.config)
    try:
        source = SourceRunner(EtcdSource(settings.etcd))
        source.start()
        try:
            from lbsync.daemon import Daemon

            daemon = Daemon(settings, config_path=args.config, started_source=source)
        except BaseException:
            source.stop(timeout=settings.etcd.timeout + 2)
            raise
        daemon.install_signal_handlers()
        daemon.run(lock_held=True)
    finally:
        lock.release()
    return EXIT_OK


def cmd_render(args: argparse.Namespace) -> int:
    from lbsync import oneshot, state_lock
    from lbsync.state_dir import prepare_state_dir

    settings = _settings(args)
    if args.once:
        prepare_state_dir(settings)
        with state_lock.acquire(settings.state_dir, args.config):  # a daemon's swaps: refused
            outcomes = oneshot.apply_once(settings)
        for outcome in outcomes:
            print(f"{outcome.target}: {outcome.action} at revision {outcome.revision}")
        return EXIT_OK if all(o.ok for o in outcomes) else EXIT_ERROR
    results = oneshot.dry_run(settings, args.target)
    for result in results:
        sys.stdout.write(result.diff)
        print(
            f"# target {result.target}: etcd revision {result.revision}, "
            f"{len(result.changed)} file(s) would change, validator: {result.verdict}"
        )
        if result.error:
            print(f"# {result.error}")
    if any(r.error for r in results):
        return EXIT_ERROR
    return EXIT_PENDING if any(r.changed for r in results) else EXIT_OK


def cmd_register(args: argparse.Namespace) -> int:
    from lbsync.registrar import InstanceSpec, Registrar

    meta = dict(_key_value(item) for item in args.meta)
    spec = InstanceSpec(args.service, args.id, args.host, args.port, args.weight, meta=meta)
    registrar = Registrar(_etcd_settings(args), spec, args.ttl)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    registrar.run(stop)
    return EXIT_OK


def cmd_mark(args: argparse.Namespace) -> int:
    from lbsync.model import State
    from lbsync.registrar import mark

    revision = mark(
        _etcd_settings(args),
        args.service,
        args.id,
        State(args.state),
        reason=args.reason,
        by=args.by,
    )
    print(f"{args.service}/{args.id} marked {args.state} at revision {revision}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from lbsync import status
    from lbsync.config_file import load_settings
    from lbsync.probes import DEFAULT_POLICY, policy_of

    listen, probes = args.http, DEFAULT_POLICY
    if args.config.exists():
        settings = load_settings(args.config, targets_optional=True)
        listen = settings.http.listen if listen is None else listen
        probes = policy_of(settings.probe)
    report = status.collect(_etcd_settings(args), listen, probes=probes)
    if args.json:
        print(json.dumps(status.to_json(report), indent=2))
    else:
        sys.stdout.write(status.format_table(report))
    return EXIT_OK


def cmd_probe(args: argparse.Namespace) -> int:
    from lbsync.config_file import load_settings
    from lbsync.probe.run import Prober, prober_name

    settings = load_settings(args.config, targets_optional=True)
    try:
        name = prober_name(settings)
    except ValueError as exc:
        raise ConfigError(str(exc), path=str(args.config), field="probe.name") from exc
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    Prober(settings, name).run(stop)
    return EXIT_OK


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"--meta takes KEY=VALUE, got {item!r}")
    return key, value


def cmd_confirm(args: argparse.Namespace) -> int:
    from lbsync import guard, state_lock
    from lbsync.state_dir import prepare_state_dir

    settings = _settings(args)
    prepare_state_dir(settings)
    if state_lock.holder(settings.state_dir) is None:
        print(f"lbsync: no daemon runs on {settings.state_dir}: nothing held", file=sys.stderr)
        return EXIT_ERROR
    path = guard.confirm_held(settings.state_dir, args.service)
    what = "every held update" if args.service is None else f"the held update of {args.service!r}"
    print(f"confirmed ({path}); the daemon applies {what} within a second")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    import structlog

    from lbsync import oneshot

    for line in oneshot.check_config(_settings(args)):
        print(f"ok  {line}")
    structlog.get_logger("lbsync.cli").debug("check.done", config=str(args.config))
    return EXIT_OK


def cmd_migrate_confd(args: argparse.Namespace) -> int:
    from lbsync import oneshot
    from lbsync.confd import migrate
    from lbsync.config_file import load_settings

    migration = migrate.convert(args.confdir, args.config)
    config = migrate.write(migration, args.out)
    print(f"wrote {config} and {len(migration.templates)} template(s)")
    for note in migration.notes:
        print(f"note: {note}")
    if not args.check:
        return EXIT_OK
    results = oneshot.dry_run(load_settings(config))
    for result in results:
        sys.stdout.write(result.diff)
        if result.error:
            print(f"# target {result.target}: {result.error}")
    if any(r.error for r in results):
        return EXIT_ERROR
    return EXIT_PENDING if any(r.diff for r in results) else EXIT_OK
