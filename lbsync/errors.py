"""Every error lbsync raises on purpose, in one tree.

::

    LbsyncError                      anything lbsync reports as a clean message + exit code
    ├── ConfigError                  lbsync's own config file / env (path, field, value)
    ├── StateLocked                  another lbsync holds the state directory (pid, config)
    ├── SourceError                  talking to etcd (endpoint)
    │   ├── SourceUnavailable        no endpoint answered; retry with backoff
    │   ├── RevisionCompacted        the resume revision is gone; resync from a full read
    │   ├── HistoryDiverged          revision went back or cluster changed; resync from a full read
    │   └── LeaseExpired             a lease could not be refreshed: it is gone with its keys
    ├── InvalidValue                 one etcd key's value is unusable (key, value, reason)
    ├── RenderError                  a template failed to load or render (template, line)
    │   ├── RenderTooLarge           a target's render is past its size cap (size, cap)
    │   └── StructureViolation       a value added a directive that benign values don't (file)
    ├── ConversionError              a confd resource or Go template lbsync cannot translate
    ├── StageError                   staging, swapping or restoring files (path)
    ├── CommandError                 an external command failed or timed out (command, stderr)
    │   └── ValidationFailed         the LB's own checker refused the staged config
    └── DriverError                  talking to the LB itself (target)
        ├── ReloadFailed             the reload could not be issued or was refused
        ├── VerifyFailed             the reload was issued but did not take effect
        └── ListenConflict           a new listen address is held by another process

Third-party exceptions are converted at the boundary with ``raise ... from exc``;
nothing above this module's classes leaks out of the library.
"""

from __future__ import annotations

from collections.abc import Sequence


class LbsyncError(Exception):
    """Base of every error lbsync raises on purpose. ``str()`` is the operator's message."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def context(self) -> dict[str, object]:
        """Structured fields for the log event that reports this error."""
        return {}


class ConfigError(LbsyncError):
    """lbsync's own configuration is unusable."""

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None) -> None:
        where = f"{path}: " if path else ""
        what = f"{field}: " if field else ""
        super().__init__(f"{where}{what}{message}")
        self.path = path
        self.field = field

    def context(self) -> dict[str, object]:
        return {"path": self.path, "field": self.field}


class StateLocked(LbsyncError):
    """Another lbsync process holds the state directory's lock (one daemon per state_dir)."""

    def __init__(self, message: str, *, path: str, holder: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.holder = holder

    def context(self) -> dict[str, object]:
        return {"path": self.path, "holder": self.holder}


class SourceError(LbsyncError):
    """etcd could not be read or watched."""

    def __init__(self, message: str, *, endpoint: str | None = None) -> None:
        super().__init__(f"etcd {endpoint}: {message}" if endpoint else f"etcd: {message}")
        self.endpoint = endpoint

    def context(self) -> dict[str, object]:
        return {"endpoint": self.endpoint}


class SourceUnavailable(SourceError):
    """No etcd endpoint answered; the caller backs off and retries."""


class RevisionCompacted(SourceError):
    """The revision a watch wanted to resume from has been compacted away."""

    def __init__(
        self, revision: int, compact_revision: int, *, endpoint: str | None = None
    ) -> None:
        super().__init__(
            f"revision {revision} was compacted (compact revision {compact_revision}); "
            "a full resync is needed",
            endpoint=endpoint,
        )
        self.revision = revision
        self.compact_revision = compact_revision

    def context(self) -> dict[str, object]:
        return {
            **super().context(),
            "revision": self.revision,
            "compact_revision": self.compact_revision,
        }


class HistoryDiverged(SourceError):
    """etcd's history is not the one the watch followed: its revision is behind the last
    one seen (restored from a snapshot) or its cluster id changed (another cluster behind
    the same endpoint). Resuming would wait for revisions that mean something else."""

    def __init__(self, reason: str, *, endpoint: str | None = None) -> None:
        super().__init__(f"{reason}; a full resync is needed", endpoint=endpoint)
        self.reason = reason


class LeaseExpired(SourceError):
    """A lease was gone when refreshed (expired or revoked); the keys put with it went too.

    The holder grants a new lease and writes its keys again.
    """

    def __init__(self, lease_id: int, *, endpoint: str | None = None) -> None:
        super().__init__(f"lease {lease_id:x} has expired", endpoint=endpoint)
        self.lease_id = lease_id

    def context(self) -> dict[str, object]:
        return {**super().context(), "lease": f"{self.lease_id:x}"}


class InvalidValue(LbsyncError):
    """One etcd value is unusable. It is dropped with a warning; the rest renders."""

    def __init__(self, key: str, value: object, reason: str) -> None:
        super().__init__(f"{key}: {reason} (value {value!r})")
        self.key = key
        self.value = value
        self.reason = reason

    def context(self) -> dict[str, object]:
        return {"key": self.key, "value": _clip(repr(self.value)), "reason": self.reason}


class RenderError(LbsyncError):
    """A template could not be loaded or rendered."""

    def __init__(self, message: str, *, template: str, line: int | None = None) -> None:
        where = f"{template}:{line}" if line else template
        super().__init__(f"{where}: {message}")
        self.template = template
        self.line = line

    def context(self) -> dict[str, object]:
        return {"template": self.template, "line": self.line}


class RenderTooLarge(RenderError):
    """A target's rendered files add up to more than its ``max_render_bytes``."""

    def __init__(self, *, template: str, size: int, cap: int) -> None:
        super().__init__(
            f"the target's render reached {size} bytes, past its cap of {cap} (max_render_bytes)",
            template=template,
        )
        self.size = size
        self.cap = cap

    def context(self) -> dict[str, object]:
        return {**super().context(), "size": self.size, "cap": self.cap}


class StructureViolation(RenderError):
    """A render holds a directive (or block, or section) that the same template does not
    produce from benign values: a value broke out of its argument. Nothing is checked or
    written; the service whose value did it is held back."""

    def __init__(self, reason: str, *, template: str, file: str, directive: str) -> None:
        super().__init__(f"{file}: {reason}: {directive!r}", template=template)
        self.file = file
        self.directive = directive

    def context(self) -> dict[str, object]:
        return {**super().context(), "file": self.file, "directive": _clip(self.directive, 200)}


class ConversionError(LbsyncError):
    """``lbsync migrate-confd`` met a confd file it cannot translate faithfully."""

    def __init__(
        self, message: str, *, path: str, line: int | None = None, column: int | None = None
    ) -> None:
        where = path if line is None else f"{path}:{line}:{column}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line
        self.column = column

    def context(self) -> dict[str, object]:
        return {"path": self.path, "line": self.line, "column": self.column}


class StageError(LbsyncError):
    """Files could not be staged, swapped in, or restored."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path

    def context(self) -> dict[str, object]:
        return {"path": self.path}


class CommandError(LbsyncError):
    """An external command failed, could not start, or ran past its timeout."""

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str],
        returncode: int | None = None,
        stderr: str = "",
    ) -> None:
        shown = " ".join(command)
        tail = f"\n{stderr.strip()}" if stderr.strip() else ""
        super().__init__(f"{message}: `{shown}`{tail}")
        self.command = list(command)
        self.returncode = returncode
        self.stderr = stderr

    def context(self) -> dict[str, object]:
        return {
            "command": self.command,
            "returncode": self.returncode,
            "stderr": _clip(self.stderr),
        }


class ValidationFailed(CommandError):
    """The LB's own checker (nginx -t, haproxy -c, check_command) refused the staged config."""


class DriverError(LbsyncError):
    """The LB could not be driven."""

    def __init__(self, message: str, *, target: str) -> None:
        super().__init__(f"target {target!r}: {message}")
        self.target = target

    def context(self) -> dict[str, object]:
        return {"target": self.target}


class ReloadFailed(DriverError):
    """The reload could not be issued, or the LB refused it."""


class VerifyFailed(DriverError):
    """The reload was issued but the LB did not come up on the new config."""


class ListenConflict(DriverError):
    """A listen address in the new config is held by a process that is not this LB."""


def _clip(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
