"""Logging, set up in one place: JSON lines off a TTY (journald, containers), console on one.

Every decision the daemon makes (change seen, render skipped, held, validated, swapped,
reloaded, verified, rolled back) is one structured event with its target, revision,
counts and durations; callers use ``structlog.get_logger("lbsync.<stage>")``.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

LogFormat = Literal["auto", "json", "console"]


def configure_logging(
    level: str = "info", fmt: LogFormat = "auto", stream: TextIO | None = None
) -> None:
    stream = stream or sys.stderr
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info if use_json else _keep,
            _stringify_paths,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=stream),  # one write per event
        cache_logger_on_first_use=False,
    )
    # Libraries that use stdlib logging (grpc, pyetcd) go to the same stream, warnings up.
    logging.basicConfig(stream=stream, level=max(numeric, logging.WARNING), force=True)


def _keep(
    _logger: object, _name: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    return event


def _stringify_paths(
    _logger: object, _name: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Paths and other non-JSON values become strings so JSON rendering never fails."""
    for key, value in event.items():
        if not isinstance(value, str | int | float | bool | list | dict | type(None)):
            event[key] = str(value)
    return event
