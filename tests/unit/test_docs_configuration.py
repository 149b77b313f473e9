"""docs/configuration.md is generated from the settings models and must stay so."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Annotated, Literal

import pytest
from pydantic import Field, TypeAdapter

from lbsync import config, config_file
from lbsync.config import Duration, Section
from lbsync.config_file import apply_env_overrides, load_settings

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "configuration.md"
EXAMPLE_CONFIG = REPO / "deploy" / "lbsync.toml.example"


def _load_generator() -> ModuleType:
    path = REPO / "scripts" / "gen_config_docs.py"
    spec = importlib.util.spec_from_file_location("gen_config_docs", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _sections(cls: type[Section] = Section) -> list[type[Section]]:
    """Every settings model of lbsync/config.py (not the ones these tests make up)."""
    found = []
    for sub in cls.__subclasses__():
        found += [sub] if sub.__module__ == config.__name__ else []
        found += _sections(sub)
    return found


def test_configuration_md_is_what_the_models_say() -> None:
    if DOC.read_text(encoding="utf-8") != gen.render():
        pytest.fail(
            "docs/configuration.md differs from lbsync/config.py: run scripts/gen_config_docs.py"
        )


def test_every_setting_has_a_description() -> None:
    missing = [
        f"{model.__name__}.{name}"
        for model in map(gen.describe, _sections())
        for name, field in model.model_fields.items()
        if not field.exclude and not (field.description or "").strip()
    ]
    assert missing == [], "add a docstring under each of these fields in lbsync/config.py"


def test_every_field_of_every_model_is_documented() -> None:
    text = DOC.read_text(encoding="utf-8")
    headings = set(re.findall(r"^### `([^`]+)`", text, flags=re.M))
    for model in _sections():
        if model is config.TargetBase:
            continue
        for name, field in model.model_fields.items():
            key = field.alias or name
            if field.exclude or gen.is_section(field.annotation) or key in ("target", "template"):
                continue
            assert any(h == key or h.endswith("." + key) for h in headings), (
                f"{model.__name__}.{key}"
            )


def test_the_complete_example_loads() -> None:
    settings = load_settings(EXAMPLE_CONFIG, environ={})
    assert [t.driver for t in settings.targets] == ["nginx"]
    assert EXAMPLE_CONFIG.read_text(encoding="utf-8") in DOC.read_text(encoding="utf-8")


def _documented(label: str) -> list[str]:
    return re.findall(rf"^- \*\*{label}\*\*: `([^`]+)`", DOC.read_text(encoding="utf-8"), re.M)


def test_the_documented_environment_overrides_are_accepted_together() -> None:
    """All at once, as settings that go together (cert and key...) must be given together."""
    environ = {}
    for entry in _documented("environment"):
        if "=" in entry:
            name, _, quoted = entry.partition("=")
            (environ[name],) = shlex.split(quoted)
    assert len(environ) > 10
    data = tomllib.loads(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    apply_env_overrides(data, environ)
    settings = config_file.settings_from_dict(
        data, base_dir=REPO, source="the documented overrides"
    )
    for name in environ:
        node: object = settings
        for step in name.removeprefix(config_file.ENV_PREFIX).lower().split("__"):
            node = getattr(node, step)
        assert node is not None, name


def _field_named(dotted: str) -> list[object]:
    """Every model field a documented ``a.b.key`` can be (one per driver for targets)."""
    *_, key = dotted.split(".")
    return [
        field
        for model in _sections()
        for name, field in model.model_fields.items()
        if (field.alias or name) == key and not gen.is_section(field.annotation)
    ]


def test_every_documented_example_is_a_valid_value() -> None:
    text = DOC.read_text(encoding="utf-8")
    entries = re.findall(
        r"^### `([^`]+)`(?: \((\w+)\))?\n(?:.*\n)*?- \*\*example\*\*: `([^`]+)`", text, re.M
    )
    assert len(entries) > 30
    for dotted, driver, example in entries:
        value = tomllib.loads(example)
        (parsed,) = value.values()
        candidates = _field_named(dotted)
        assert candidates, dotted
        accepted = []
        for field in candidates:
            adapter = TypeAdapter(Annotated[field.annotation, field])
            try:
                adapter.validate_python(parsed)
                accepted.append(field)
            except ValueError:
                continue
        assert accepted, f"{dotted} ({driver}): example {example!r} is refused"


class _NewSection(Section):
    deadline: Duration = 2.5
    """A new duration."""
    dropbox: Path | None = Field(default=None, examples=["/srv/drop"])
    """A new optional path."""
    weights: dict[str, int] = Field(default={})
    """A new table."""


def test_a_new_field_shows_up_with_type_default_environment_and_example() -> None:
    place = gen.Place(toml_path=("new",), header="[new]", env=True)
    text = "\n".join(gen.section(_NewSection, place, "`[new]`"))
    assert "### `new.deadline`\n\nA new duration.\n\n- **type**: duration\n" in text
    assert '- **default**: `"2.5s"`' in text
    assert "- **environment**: `LBSYNC_NEW__DEADLINE=2.5s`" in text
    assert '- **example**: `dropbox = "/srv/drop"`' in text
    assert "- **type**: table of string → integer" in text


def test_a_field_without_a_description_stops_the_generator() -> None:
    class Undocumented(Section):
        silent: int = 1

    place = gen.Place(toml_path=("x",), header="[x]", env=True)
    with pytest.raises(ValueError, match=r"x\.silent has no description"):
        list(gen.section(Undocumented, place, "`[x]`"))


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0s"), (0.05, "50ms"), (1.0, "1s"), (1.5, "1.5s"), (300.0, "5m"), (7200.0, "2h")],
)
def test_durations_are_written_as_a_person_would(seconds: float, text: str) -> None:
    assert gen.duration_text(seconds) == text
    assert config.parse_duration(text) == pytest.approx(seconds)


def test_check_mode_reports_a_stale_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gen.main(["--check"]) == 0
    stale = tmp_path / "configuration.md"
    stale.write_text(DOC.read_text(encoding="utf-8").replace("etcd", "etcd3", 1))
    monkeypatch.setattr(gen, "OUTPUT", stale)
    assert gen.main(["--check"]) == 1
    assert "run scripts/gen_config_docs.py" in capsys.readouterr().out


class _Thing(Section):
    name: str
    """Its name."""


class _ThingA(_Thing):
    kind: Literal["a"]
    """The first kind."""
    extra: int = 1
    """Only the first kind has it."""


class _ThingB(_Thing):
    kind: Literal["b"]
    """The second kind."""


def test_a_new_kind_of_target_and_its_own_keys_show_up() -> None:
    place = gen.Place(toml_path=("thing",), header="[[thing]]", env=False)
    holder = Field(description="Things, each of a kind.")
    text = "\n".join(gen.tagged_union([_ThingA, _ThingB], place, holder))
    assert "## `[[thing]]`: every kind\n\nThings, each of a kind." in text
    assert "| `name` | ✓ | ✓ |" in text
    assert "| `extra` | ✓ |  |" in text
    assert "### `thing.extra` (a)\n\nOnly the first kind has it." in text
    assert '## `[[thing]]` with `kind = "b"`' in text
    assert "- **environment**: none (inside `[[thing]]`: set it in the file)" in text
