"""confd's configuration (``confd.toml``, ``conf.d/*.toml``) → frozen models.

Only what a migration can carry over faithfully is accepted: a key lbsync has no
equivalent for and that changes what confd writes (another backend, ``srv_record``…)
stops the migration with the file and key; keys that only tune confd's own loop
(``interval``, ``log-level``…) are listed as notes, since lbsync always watches.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lbsync.confd.store import go_path_join
from lbsync.errors import ConversionError

# confd.toml keys that tune confd's own loop: lbsync watches etcd and has its own.
_LOOP_KEYS = frozenset(
    {"interval", "watch", "log-level", "confdir", "noop", "onetime", "sync-only"}
)
_ETCD_KEYS = frozenset(
    {"backend", "nodes", "prefix", "scheme", "client_cakeys", "client_cert", "client_key"}
    | {"basic_auth", "username", "password"}
)
_RESOURCE_KEYS = frozenset(
    {"src", "dest", "keys", "prefix", "mode", "uid", "gid", "owner", "group"}
    | {"check_cmd", "reload_cmd"}
)
_SRC_PLACEHOLDER = re.compile(r"\{\{-?\s*\.src\s*-?\}\}")


@dataclass(frozen=True)
class ConfdSettings:
    """confd.toml's backend part: what becomes lbsync's ``[etcd]``."""

    endpoints: tuple[str, ...]
    prefix: str
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    user: str | None
    password: str | None
    notes: tuple[str, ...]


@dataclass(frozen=True)
class Resource:
    """One ``conf.d/*.toml`` template resource."""

    path: Path
    src: str
    dest: str
    keys: tuple[str, ...]
    prefix: str  # the resource's own prefix, under confd's global one
    mode: int | None
    check_cmd: str | None
    reload_cmd: str | None
    owner: str | None  # uid/owner/gid/group as written, for the note lbsync leaves

    @property
    def name(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.path.stem)

    def check_command(self) -> str | None:
        """check_cmd with ``{{.src}}`` (confd's staged file) as lbsync's ``{staged}``."""
        if self.check_cmd is None:
            return None
        command = _SRC_PLACEHOLDER.sub("{staged}", self.check_cmd)
        if "{{" in command:
            raise ConversionError(
                f"check_cmd {self.check_cmd!r}: only {{{{.src}}}} can be translated",
                path=str(self.path),
            )
        return command


def _load(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConversionError(f"cannot read: {exc.strerror}", path=str(path)) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"not valid TOML: {exc}", path=str(path)) from exc


def _string(data: dict[str, Any], key: str, path: Path) -> str | None:
    value = data.get(key)
    if value is None or isinstance(value, str):
        return value
    raise ConversionError(f"{key} must be a string, got {value!r}", path=str(path))


def read_confd_settings(path: Path | None) -> ConfdSettings:
    """confd.toml (or confd's defaults when there is none) → ConfdSettings."""
    data = _load(path) if path is not None else {}
    where = path or Path("confd.toml")
    unknown = sorted(set(data) - _ETCD_KEYS - _LOOP_KEYS)
    if unknown:
        raise ConversionError(
            f"{', '.join(unknown)}: no lbsync equivalent (lbsync reads etcd v3 only)",
            path=str(where),
        )
    backend = data.get("backend", "etcd")
    if backend not in ("etcd", "etcdv3"):
        raise ConversionError(f"backend {backend!r}: lbsync reads etcd (v3) only", path=str(where))
    notes = [
        f"confd.toml {key}: not carried (lbsync always watches etcd and checks before it swaps)"
        for key in sorted(set(data) & _LOOP_KEYS)
    ]
    if backend == "etcd":
        notes.append("backend 'etcd' (v2 API in confd): lbsync reads keys through the v3 API")
    scheme = _string(data, "scheme", where) or "http"
    nodes = data.get("nodes", ["127.0.0.1:2379"])
    if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
        raise ConversionError(f"nodes must be a list of strings, got {nodes!r}", path=str(where))
    endpoints = tuple(n if "://" in n else f"{scheme}://{n}" for n in nodes)
    use_auth = bool(data.get("basic_auth", False))
    return ConfdSettings(
        endpoints=endpoints,
        prefix=go_path_join("/", _string(data, "prefix", where) or ""),
        ca_file=_string(data, "client_cakeys", where),
        cert_file=_string(data, "client_cert", where),
        key_file=_string(data, "client_key", where),
        user=_string(data, "username", where) if use_auth else None,
        password=_string(data, "password", where) if use_auth else None,
        notes=tuple(notes),
    )


def read_resource(path: Path) -> Resource:
    data = _load(path)
    table = data.get("template")
    if not isinstance(table, dict) or set(data) != {"template"}:
        raise ConversionError("expected one [template] table", path=str(path))
    unknown = sorted(set(table) - _RESOURCE_KEYS)
    if unknown:
        raise ConversionError(f"{', '.join(unknown)}: unknown template key", path=str(path))
    for required in ("src", "dest", "keys"):
        if required not in table:
            raise ConversionError(f"{required}: missing", path=str(path))
    keys = table["keys"]
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ConversionError(f"keys must be a list of strings, got {keys!r}", path=str(path))
    owner = [f"{k}={table[k]}" for k in ("owner", "uid", "group", "gid") if k in table]
    return Resource(
        path=path,
        src=str(_string(table, "src", path)),
        dest=str(_string(table, "dest", path)),
        keys=tuple(keys),
        prefix=go_path_join("/", _string(table, "prefix", path) or ""),
        mode=_mode(table.get("mode"), path),
        check_cmd=_string(table, "check_cmd", path),
        reload_cmd=_string(table, "reload_cmd", path),
        owner=" ".join(owner) or None,
    )


def _mode(value: object, path: Path) -> int | None:
    """confd parses mode with strconv.ParseUint(mode, 0, 32): "0644", "0o644", "420"."""
    if value is None:
        return None
    text = str(value)
    match = re.fullmatch(r"0[oO]?([0-7]+)|([1-9][0-9]*)|0", text)
    if match is None:
        raise ConversionError(f"mode {text!r} is not a file mode like '0644'", path=str(path))
    if match.group(1):
        return int(match.group(1), 8)
    return int(match.group(2) or "0")


def read_resources(confdir: Path) -> list[Resource]:
    """Every ``conf.d/*.toml`` under ``confdir``, in name order."""
    files = sorted((confdir / "conf.d").glob("*.toml"))
    if not files:
        raise ConversionError("no template resources (conf.d/*.toml)", path=str(confdir))
    return [read_resource(path) for path in files]
