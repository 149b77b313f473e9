"""A generic LB driven by commands: confd's ``check_cmd``/``reload_cmd`` escape hatch.

``check_command`` may name the staged files: ``{staged}`` is the staged copy of the
first template's destination, ``{staged_root}`` the staged tree. Substitution is plain
text replacement (not ``str.format``), so braces elsewhere in a shell line are left
alone; in shell mode the substituted paths are quoted. The reload command's exit status
is the verdict: ``verify`` has nothing more to look at.
"""

from __future__ import annotations

import shlex
import time

import structlog

from lbsync.commands import run_command
from lbsync.config import CommandTarget
from lbsync.drivers.base import Driver, ReloadTicket, register_driver
from lbsync.errors import CommandError, ReloadFailed, ValidationFailed
from lbsync.stage.tree import StagedConfig

log = structlog.get_logger("lbsync.drivers.command")


@register_driver("command")
class CommandDriver(Driver):
    target: CommandTarget

    @property
    def checks_staged_tree(self) -> bool:
        return self.target.check_command is not None

    def validate(self, staged: StagedConfig) -> None:
        if self.target.check_command is None:
            return
        argv = self._substitute(self.target.check_command, staged)
        run_command(
            argv,
            timeout=self.target.command_timeout,
            shell=self.target.shell,
            error=ValidationFailed,
            what="check command refused the staged config",
        )
        log.debug("command.validated", target=self.name)

    def reload(self) -> ReloadTicket:
        started = time.monotonic()
        try:
            run_command(
                self.target.reload_command,
                timeout=self.target.command_timeout,
                shell=self.target.shell,
                what="reload command failed",
            )
        except CommandError as err:
            raise ReloadFailed(str(err), target=self.name) from err
        log.info("command.reloaded", target=self.name)
        return ReloadTicket(started_at=started)

    def verify(self, ticket: ReloadTicket) -> None:
        """Nothing to check: the reload command's exit status was the verdict."""

    def _substitute(self, argv: list[str], staged: StagedConfig) -> list[str]:
        first = self.target.templates[0].dest
        values = {
            "{staged}": str(staged.files.get(first, staged.root)),
            "{staged_root}": str(staged.root),
        }
        if self.target.shell:
            values = {key: shlex.quote(value) for key, value in values.items()}
        return [_replace_all(arg, values) for arg in argv]


def _replace_all(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace(key, value)
    return text
