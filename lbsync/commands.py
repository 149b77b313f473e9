"""Running external commands (LB checkers, reload commands): always bounded, stderr kept."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from lbsync.errors import CommandError


def run_command(
    argv: Sequence[str],
    *,
    timeout: float,
    shell: bool = False,
    error: type[CommandError] = CommandError,
    what: str = "command failed",
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (as one shell line when ``shell``); raise ``error`` unless it exits 0.

    The exception carries the command, exit code and combined stderr/stdout so the log
    event says why, not just that.
    """
    args: str | list[str] = " ".join(argv) if shell else list(argv)
    try:
        done = subprocess.run(
            args,
            shell=shell,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise error(
            f"timed out after {timeout:g}s", command=argv, stderr=_text(exc.stderr)
        ) from exc
    except OSError as exc:
        raise error(f"could not start: {exc.strerror}", command=argv) from exc
    if done.returncode != 0:
        raise error(
            f"{what} (exit {done.returncode})",
            command=argv,
            returncode=done.returncode,
            stderr=(done.stderr or "") + (done.stdout or ""),
        )
    return done


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")
