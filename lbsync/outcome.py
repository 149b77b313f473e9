"""What one round did to one target: the ``Outcome`` the pipeline returns and metrics count."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from lbsync.errors import LbsyncError
from lbsync.isolation import HeldService

Action = Literal["unchanged", "runtime", "reloaded", "rolled_back", "failed"]


@dataclass(frozen=True)
class Outcome:
    target: str
    revision: int
    action: Action
    files: tuple[str, ...] = ()
    error: LbsyncError | None = None
    durations: Mapping[str, float] = field(default_factory=dict)
    held: Mapping[str, HeldService] = field(default_factory=dict)  # services held back

    @property
    def ok(self) -> bool:
        return self.action in ("unchanged", "runtime", "reloaded")
