"""The ``lbsync`` command: parse, build settings, call the library, map errors to exit codes.

Exit codes: 0 ok (for ``render --dry-run``: no change), 1 error, 2 changes pending
(``render --dry-run`` only, like ``terraform plan -detailed-exitcode``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from lbsync import __version__
from lbsync.config import Settings, load_settings
from lbsync.errors import LbsyncError
from lbsync.logging import configure_logging

EXIT_OK, EXIT_ERROR, EXIT_PENDING = 0, 1, 2
DEFAULT_CONFIG = "/etc/lbsync/lbsync.toml"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configure_logging(args.log_level, args.log_format)
        return int(args.handler(args))
    except LbsyncError as err:
        print(f"lbsync: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbsync", description="Keep nginx/HAProxy in step with instances registered in etcd."
    )
    parser.add_argument("--version", action="version", version=f"lbsync {__version__}")
    parser.set_defaults(handler=lambda _args: parser.print_help() or EXIT_ERROR)
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
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def cmd_run(args: argparse.Namespace) -> int:
    from lbsync.daemon import Daemon

    daemon = Daemon(_settings(args), config_path=args.config)
    daemon.install_signal_handlers()
    daemon.run()
    return EXIT_OK


def cmd_render(args: argparse.Namespace) -> int:
    from lbsync import oneshot

    settings = _settings(args)
    if args.once:
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


def cmd_check(args: argparse.Namespace) -> int:
    from lbsync import oneshot

    for line in oneshot.check_config(_settings(args)):
        print(f"ok  {line}")
    structlog.get_logger("lbsync.cli").debug("check.done", config=str(args.config))
    return EXIT_OK
