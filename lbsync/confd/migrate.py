"""A confd directory → an lbsync.toml and Jinja2 templates (``lbsync migrate-confd``).

Each confd template resource becomes one ``command`` target (``check_cmd`` →
``check_command`` with ``{staged}``, ``reload_cmd`` → ``reload_command``, both run by the
shell as confd ran them) with one template. confd.toml's backend settings become
``[etcd]``: its prefix is lbsync's prefix, and a resource's own ``prefix`` and ``keys``
are baked into its converted template (``confd.store(prefix, keys)``), so the template
sees exactly the keys confd loaded for it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from lbsync.confd.gotemplate import parse
from lbsync.confd.jinja import emit
from lbsync.confd.resources import ConfdSettings, Resource, read_confd_settings, read_resources
from lbsync.confd.store import go_path_join
from lbsync.errors import ConversionError

CONFIG_NAME = "lbsync.toml"
PASSWORD_NAME = "etcd-password"

log = structlog.get_logger("lbsync.confd")


@dataclass(frozen=True)
class Migration:
    """Everything ``migrate-confd`` writes, as text, and what the operator must know."""

    config: str
    templates: tuple[tuple[str, str], ...]  # (path relative to the output dir, source)
    password: str | None
    notes: tuple[str, ...]


def convert_template(source: str, path: str, resource: Resource, origin: str = "") -> str:
    """One Go template → Jinja2 source, bound to the resource's prefix and keys.

    ``path`` names the file in errors; ``origin`` (default: ``path``) in the header.
    """
    nodes = parse(source, path)
    return emit(nodes, prefix=resource.prefix, keys=resource.keys, origin=origin or path)


def convert(confdir: Path, confd_config: Path | None = None) -> Migration:
    """Read a confd directory and translate all of it, or raise ConversionError."""
    if confd_config is None and (confdir / "confd.toml").is_file():
        confd_config = confdir / "confd.toml"
    settings = read_confd_settings(confd_config)
    resources = read_resources(confdir)
    notes = list(settings.notes)
    templates: list[tuple[str, str]] = []
    targets: list[str] = []
    names: set[str] = set()
    for resource in _uniquely_named(resources):
        # confd: filepath.Join(TemplateDir, src), so an absolute src stays under templates/
        src = Path(go_path_join(str(confdir / "templates"), resource.src))
        try:
            source = src.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConversionError(f"cannot read: {exc.strerror}", path=str(src)) from exc
        name = _unique(f"templates/{Path(resource.src).stem}.j2", resource.name, names)
        origin = f"{resource.path.name} ({os.path.relpath(src, confdir)})"
        templates.append((name, convert_template(source, str(src), resource, origin)))
        targets.append(_target(resource, name))
        if resource.owner:
            notes.append(
                f"{resource.path.name}: {resource.owner}: lbsync keeps the owner and group "
                f"of the existing {resource.dest}; chown it once if it differs"
            )
        if resource.reload_cmd is None:
            notes.append(f"{resource.path.name}: no reload_cmd: the target reloads with 'true'")
    config = "\n".join([_header(confdir), _etcd_table(settings), *targets])
    log.info("migrate.converted", confdir=str(confdir), resources=len(resources), notes=len(notes))
    return Migration(config, tuple(templates), settings.password, tuple(notes))


def _uniquely_named(resources: list[Resource]) -> list[Resource]:
    """Target names come from file names; two that clean to the same name are refused."""
    seen: dict[str, Path] = {}
    for resource in resources:
        if resource.name in seen:
            raise ConversionError(
                f"its target name {resource.name!r} is also {seen[resource.name].name}'s: "
                "rename one of the files",
                path=str(resource.path),
            )
        seen[resource.name] = resource.path
    return resources


def _unique(name: str, resource: str, taken: set[str]) -> str:
    if name in taken:
        name = name.removesuffix(".j2") + f".{resource}.j2"
    taken.add(name)
    return name


def _toml(value: str | Sequence[str]) -> str:
    """A TOML basic string or array of them (JSON's escapes are TOML's)."""
    return json.dumps(value if isinstance(value, str) else list(value), ensure_ascii=False)


def _header(confdir: Path) -> str:
    return (
        f"# Written by `lbsync migrate-confd` from {confdir}.\n"
        "# One target per confd template resource; see docs/migrating-from-confd.md.\n"
    )


def _etcd_table(settings: ConfdSettings) -> str:
    lines = [
        "[etcd]",
        f"endpoints = {_toml(settings.endpoints)}",
        f"prefix = {_toml(settings.prefix)}",
    ]
    for key in ("ca_file", "cert_file", "key_file", "user"):
        value = getattr(settings, key)
        if value is not None:
            lines.append(f"{key} = {_toml(value)}")
    if settings.user is not None:
        lines.append(f"password_file = {_toml(PASSWORD_NAME)}")
    return "\n".join(lines) + "\n"


def _target(resource: Resource, template: str) -> str:
    lines = [
        f"# from {resource.path.name}: keys {', '.join(resource.keys)} under prefix "
        f"{resource.prefix}",
        "[[target]]",
        f"name = {_toml(resource.name)}",
        'driver = "command"',
        "shell = true",
    ]
    check = resource.check_command()
    if check is not None:
        lines.append(f"check_command = {_toml([check])}")
    lines.append(f"reload_command = {_toml([resource.reload_cmd or 'true'])}")
    lines += [
        "  [[target.template]]",
        f"  src = {_toml(template)}",
        f"  dest = {_toml(resource.dest)}",
    ]
    if resource.mode is not None:
        lines.append(f"  mode = 0o{resource.mode:o}")
    return "\n".join(lines) + "\n"


def write(migration: Migration, out: Path) -> Path:
    """Write the migration under ``out`` (created if needed); returns the lbsync.toml path.

    Existing files are not overwritten: a migration writes into a fresh directory.
    """
    files = [(CONFIG_NAME, migration.config), *migration.templates]
    if migration.password is not None:
        files.append((PASSWORD_NAME, migration.password))
    for name, _text in files:
        if (out / name).exists():
            raise ConversionError("already exists: write into a fresh --out", path=str(out / name))
    try:
        for name, text in files:
            path = out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            mode = 0o600 if name == PASSWORD_NAME else 0o644
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
                handle.write(text)
    except OSError as exc:
        raise ConversionError(f"cannot write: {exc.strerror}", path=str(out)) from exc
    return out / CONFIG_NAME
