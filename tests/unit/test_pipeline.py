import stat
from pathlib import Path

import pytest

from lbsync.config import CommandTarget
from lbsync.drivers.command import CommandDriver
from lbsync.pipeline import TargetPipeline
from lbsync.render import Renderer
from lbsync.testing import FakeDriver, snapshot_from


def pipeline(tmp_path: Path, mode: int | None) -> tuple[TargetPipeline, Path]:
    (tmp_path / "t.j2").write_text("{{ services | length }}\n")
    dest = tmp_path / "out.conf"
    template: dict[str, object] = {"src": tmp_path / "t.j2", "dest": dest}
    if mode is not None:
        template["mode"] = mode
    target = CommandTarget.model_validate(
        {"name": "lb", "driver": "command", "reload_command": ["true"], "template": [template]}
    )
    return TargetPipeline(target, FakeDriver(target), Renderer(), tmp_path / "state"), dest


def test_template_mode_is_applied(tmp_path: Path) -> None:
    pipe, dest = pipeline(tmp_path, 0o640)
    assert pipe.apply(snapshot_from({})).action == "reloaded"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640


def test_plan_diff_and_unchanged(tmp_path: Path) -> None:
    pipe, dest = pipeline(tmp_path, None)
    plan = pipe.plan(snapshot_from({"services": {"web": {"instances": {"a": "10.0.0.1:80"}}}}))
    assert plan.diff().splitlines()[:3] == ["--- /dev/null", f"+++ {dest}", "@@ -0,0 +1 @@"]
    assert pipe.apply(plan.snapshot).action == "reloaded"
    assert pipe.apply(plan.snapshot).action == "unchanged"


@pytest.mark.parametrize("check", [None, ["test", "-s", "{staged}"]])
def test_a_tree_is_staged_only_for_a_driver_that_checks_it(
    tmp_path: Path, check: list[str] | None
) -> None:
    (tmp_path / "t.j2").write_text("{{ services | length }}\n")
    dest = tmp_path / "out.conf"
    target = CommandTarget.model_validate(
        {
            "name": "lb",
            "driver": "command",
            "reload_command": ["true"],
            "check_command": check,
            "template": [{"src": tmp_path / "t.j2", "dest": dest}],
        }
    )
    pipe = TargetPipeline(target, CommandDriver(target), Renderer(), tmp_path / "state")

    assert pipe.apply(snapshot_from({})).action == "reloaded"
    assert dest.read_bytes() == b"0\n"
    staged = pipe.workdir.exists() and any(pipe.workdir.iterdir())
    assert staged is (check is not None)
