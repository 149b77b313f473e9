"""Reading lbsync.toml: a TOML file, overridden by ``LBSYNC_*`` environment variables,
validated into ``Settings`` with errors that name the field, its value and the file.

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
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lbsync.config import Settings
from lbsync.errors import ConfigError

ENV_PREFIX = "LBSYNC_"


def load_settings(
    path: Path, environ: Mapping[str, str] | None = None, *, targets_optional: bool = False
) -> Settings:
    """Read, merge with the environment, resolve relative paths, validate. Raises ConfigError.

    ``targets_optional``: a file without ``[[target]]`` is accepted (``lbsync probe`` may run
    where there is no load balancer)."""
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
    return settings_from_dict(
        data, base_dir=path.resolve().parent, source=str(path), targets_optional=targets_optional
    )


def settings_from_dict(
    data: dict[str, Any], *, base_dir: Path, source: str, targets_optional: bool = False
) -> Settings:
    """Validate a parsed config; ``source`` names it in messages."""
    try:
        context = {"targets_optional": targets_optional}
        settings = Settings.model_validate(data, context=context)
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
