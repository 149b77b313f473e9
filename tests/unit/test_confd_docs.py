"""docs/migrating-from-confd.md: every tagged block is checked against what the code does.

``file=PATH`` blocks are the fixture confd directory's files, ``generated=lbsync.toml``
is what the migration writes for it, ``transcript=migrate`` what the command prints, and
each ``example=NAME`` group (Go template, keys, converted template, output) is converted
and rendered by lbsync and by Go."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lbsync.cli import main
from lbsync.confd import migrate
from lbsync.confd.resources import Resource
from tests.confd.reference import FIXTURES, GoRender, go_render, render_lbsync

__all__ = ["go_render"]  # the fixture, imported to be used here

DOC = Path(__file__).resolve().parents[2] / "docs" / "migrating-from-confd.md"
_BLOCK = re.compile(r"^```(\S+) (\w+)=(\S+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks(tag: str) -> dict[tuple[str, str], str]:
    """(language, value) → text of every block tagged ``tag=value``."""
    found = {
        (lang, value): text
        for lang, name, value, text in _BLOCK.findall(DOC.read_text())
        if name == tag
    }
    assert found, f"no {tag}= block in {DOC.name}"
    return found


def examples() -> list[str]:
    return sorted({value for _lang, value in blocks("example")})


def convert(name: str, tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """The example's Go template and its conversion, written out, and its keys."""
    group = blocks("example")
    original = tmp_path / f"{name}.tmpl"
    original.write_text(group[("go-template", name)])
    resource = Resource(
        tmp_path / "r.toml", original.name, "/x", ("/",), "/", None, None, None, None
    )
    converted = tmp_path / f"{name}.j2"
    converted.write_text(migrate.convert_template(original.read_text(), str(original), resource))
    keys: dict[str, str] = json.loads(group[("json", name)])
    return original, converted, keys


def test_the_worked_migration_shows_the_fixture_files() -> None:
    shown = blocks("file")
    assert len(shown) == 7
    for (_lang, path), text in shown.items():
        assert text == (FIXTURES / path).read_text(), path


def test_the_worked_migration_shows_the_generated_config() -> None:
    (text,) = blocks("generated").values()
    assert text == migrate.convert(FIXTURES).config.replace(str(FIXTURES), "/etc/confd")


def test_the_worked_migration_shows_what_the_command_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (text,) = blocks("transcript").values()
    command, *printed = text.splitlines()
    out = tmp_path / "out"
    assert main(["migrate-confd", "--confdir", str(FIXTURES), "--out", str(out)]) == 0
    assert capsys.readouterr().out.replace(str(out), "/etc/lbsync/migrated").splitlines() == printed
    assert command == "$ lbsync migrate-confd --confdir /etc/confd --out /etc/lbsync/migrated"


@pytest.mark.parametrize("name", examples())
def test_each_example_converts_and_renders_as_shown(name: str, tmp_path: Path) -> None:
    _original, converted, keys = convert(name, tmp_path)
    group = blocks("example")
    assert converted.read_text().split("+%}", 1)[1] == group[("jinja", name)]
    assert render_lbsync(converted, keys, "/").decode() == group[("text", name)]


@pytest.mark.parametrize("name", examples())
def test_each_example_is_what_go_renders(go_render: GoRender, name: str, tmp_path: Path) -> None:
    original, _converted, keys = convert(name, tmp_path)
    assert go_render(original, keys, "/", ["/"]).decode() == blocks("example")[("text", name)]
