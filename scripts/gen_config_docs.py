#!/usr/bin/env python3
"""Write docs/configuration.md from the settings models in lbsync/config.py.

Every section, key, type, default, description and example comes from the models (their
attribute docstrings and ``Field(examples=...)``), so a field added to config.py shows up
here by running this script again; tests/unit/test_docs_configuration.py fails while the
file and the models disagree.

    .venv/bin/python scripts/gen_config_docs.py           # rewrite docs/configuration.md
    .venv/bin/python scripts/gen_config_docs.py --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import re
import shlex
import sys
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, BeforeValidator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from lbsync import config, config_file

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "docs" / "configuration.md"
EXAMPLE_CONFIG = REPO / "deploy" / "lbsync.toml.example"

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}


@dataclass(frozen=True)
class Place:
    """Where a model's fields live in lbsync.toml, and whether the environment reaches them."""

    toml_path: tuple[str, ...]  # keys from the top, e.g. ("etcd",) or ("target", "template")
    header: str  # how the file opens the table: "[etcd]", "[[target]]", "" for the top level
    env: bool  # False inside arrays of tables: the environment cannot step into them
    label: str = ""  # told after each heading when one key has several meanings (per driver)


# --- types, defaults and values as a reader of lbsync.toml sees them ------------------------


def describe(model: type[BaseModel]) -> type[BaseModel]:
    """Give the model's fields their attribute docstrings as descriptions.

    lbsync/config.py does not have pydantic read them at import (``use_attribute_docstrings``
    parses config.py's source once per model: ~25 ms of every ``lbsync`` command's start-up),
    so the generator reads them here, from the classes' source, inherited ones included."""
    docs: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if issubclass(cls, BaseModel) and cls is not BaseModel:
            docs.update(_attribute_docstrings(cls))
    for name, field in model.model_fields.items():
        if field.description is None and name in docs:
            field.description = docs[name]
    return model


def _attribute_docstrings(cls: type) -> dict[str, str]:
    """``name: type = default`` followed by a string, in the class body: name → that string."""
    (klass,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    assert isinstance(klass, ast.ClassDef)
    found = {}
    for stmt, after in zip(klass.body, klass.body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            found[stmt.target.id] = inspect.cleandoc(after.value.value)
    return found


def is_section(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def is_duration(metadata: list[Any]) -> bool:
    return _has_validator_of(config.Duration, metadata)


def _has_validator_of(alias: object, metadata: list[Any]) -> bool:
    """Whether ``metadata`` holds the validator of the ``Annotated`` type ``alias`` (pydantic
    moves it there from the annotation when the field's type is the alias itself)."""
    own = [m for m in typing.get_args(alias)[1:] if isinstance(m, BeforeValidator)]
    return any(m in own for m in metadata)


def type_name(annotation: object, metadata: list[Any]) -> str:
    """``list[str]`` → "list of strings"; constraints from ``metadata`` appended."""
    return _bare_type_name(annotation, metadata) + _constraints(metadata)


def _bare_type_name(annotation: object, metadata: list[Any]) -> str:
    if is_duration(metadata):
        return "duration"
    if annotation == config.Command or _has_validator_of(config.Command, metadata):
        return "command (list of strings; a string is split on whitespace)"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _bare_type_name(args[0], list(args[1:]))
    if origin in (Union, types.UnionType):
        names = [_bare_type_name(a, []) for a in args if a is not type(None)]
        return " or ".join(names)
    if origin is Literal:
        return " or ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (list, tuple, set, frozenset):
        return f"list of {_plural(_bare_type_name(args[0], []))}"
    if origin is dict:
        key, value = (_bare_type_name(a, []) for a in args)
        return f"table of {key} → {value}"
    if is_section(annotation):
        return "table"
    if isinstance(annotation, type) and annotation in _SCALAR_TYPES:
        return _SCALAR_TYPES[annotation]
    raise TypeError(
        f"gen_config_docs: no reader's name for the type {annotation!r}: add one to type_name"
    )


def _plural(name: str) -> str:
    return name if name.startswith(("list", "table", "`")) else name + "s"


def _constraints(metadata: list[Any]) -> str:
    parts = []
    for item in metadata:
        for attr, text in (("ge", "≥ {}"), ("gt", "> {}"), ("le", "≤ {}"), ("lt", "< {}")):
            if getattr(item, attr, None) is not None:
                parts.append(text.format(getattr(item, attr)))
        if getattr(item, "min_length", None) is not None:
            parts.append(f"at least {item.min_length}")
        if getattr(item, "pattern", None) is not None:
            parts.append(f"matching `{item.pattern}`")
    return f" ({', '.join(parts)})" if parts else ""


def toml_value(value: object, *, duration: bool = False) -> str:
    """``value`` written as lbsync.toml would hold it."""
    if duration and isinstance(value, int | float) and not isinstance(value, bool):
        return json.dumps(duration_text(float(value)))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"gen_config_docs: cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def duration_text(seconds: float) -> str:
    """5.0 → "5s", 0.05 → "50ms", 1.5 → "1.5s", 300.0 → "5m"."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds == 0 or seconds >= 1:
        return f"{seconds:g}s"
    return f"{seconds * 1000:g}ms"


def env_value(value: object, *, duration: bool = False) -> str:
    """``value`` as an ``LBSYNC_*`` variable carries it: strings as they are, else JSON."""
    if duration and isinstance(value, int | float) and not isinstance(value, bool):
        return duration_text(float(value))
    if isinstance(value, Path):
        value = str(value)
    text = value if isinstance(value, str) else json.dumps(value)
    return shlex.quote(text)


def example_of(field: FieldInfo) -> object | None:
    """The field's first example, else its default; None when it has neither."""
    if field.examples:
        return field.examples[0]
    if typing.get_origin(field.annotation) is Literal:
        return typing.get_args(field.annotation)[0]
    if field.default is PydanticUndefined or field.default is None:
        return None
    return field.default


# --- the document ---------------------------------------------------------------------------


def key_of(name: str, field: FieldInfo) -> str:
    """The key as written in lbsync.toml (the alias when there is one)."""
    return field.alias or name


def field_entry(name: str, field: FieldInfo, place: Place) -> Iterator[str]:
    key = key_of(name, field)
    dotted = ".".join([*place.toml_path, key])
    duration = is_duration(field.metadata)
    yield f"### `{dotted}` ({place.label})" if place.label else f"### `{dotted}`"
    yield ""
    yield paragraph(field, dotted)
    yield ""
    yield f"- **type**: {type_name(field.annotation, field.metadata)}"
    yield f"- **default**: {_default_text(field, duration)}"
    example = example_of(field)
    yield f"- **environment**: {_env_text(place, key, example, duration)}"
    if example is not None:
        yield f"- **example**: `{key} = {toml_value(example, duration=duration)}`"
    yield ""


def paragraph(field: FieldInfo, where: str) -> str:
    """The field's description, rewrapped."""
    if not field.description:
        raise ValueError(f"gen_config_docs: {where} has no description (add a docstring)")
    return textwrap.fill(" ".join(field.description.split()), width=92, break_on_hyphens=False)


def _default_text(field: FieldInfo, duration: bool) -> str:
    if field.default is PydanticUndefined:
        return "none: required"
    if field.default is None:
        return "unset"
    return f"`{toml_value(field.default, duration=duration)}`"


def _env_text(place: Place, key: str, example: object | None, duration: bool) -> str:
    if not place.env:
        return f"none (inside `{place.header}`: set it in the file)"
    name = config_file.ENV_PREFIX + "__".join([*place.toml_path, key]).upper()
    if example is None:
        return f"`{name}`"
    text = f"`{name}={env_value(example, duration=duration)}`"
    if isinstance(example, dict) and example:
        entry, value = next(iter(example.items()))
        text += f", or one entry: `{name}__{entry.upper()}={env_value(value)}`"
    return text


def section(
    model: type[BaseModel], place: Place, title: str, intro: FieldInfo | None = None
) -> Iterator[str]:
    """A model's own fields under ``title``, then its sub-tables as sections of their own;
    ``intro`` is the field that holds the table (its description opens the section)."""
    describe(model)
    plain = {n: f for n, f in model.model_fields.items() if not f.exclude and not _nested(f)}
    yield f"## {title}"
    yield ""
    if intro is not None:
        yield paragraph(intro, title)
        yield ""
    for name, field in plain.items():
        yield from field_entry(name, field, place)
    yield from nested_sections(model, place)


def _nested(field: FieldInfo) -> bool:
    return _table_model(field) is not None or _array_models(field) is not None


def _table_model(field: FieldInfo) -> type[BaseModel] | None:
    return field.annotation if is_section(field.annotation) else None  # type: ignore[return-value]


def _array_models(field: FieldInfo) -> list[type[BaseModel]] | None:
    """The model(s) of an array of tables (several: a tagged union such as targets)."""
    if typing.get_origin(field.annotation) is not list:
        return None
    (item,) = typing.get_args(field.annotation)
    if typing.get_origin(item) is typing.Annotated:
        item = typing.get_args(item)[0]
    members = typing.get_args(item) if typing.get_origin(item) in (Union, types.UnionType) else ()
    models = [m for m in (members or (item,)) if is_section(m)]
    return models or None


def nested_sections(
    model: type[BaseModel], place: Place, only: set[str] | None = None
) -> Iterator[str]:
    """A section for each of the model's fields that is a table or an array of tables
    (those named in ``only``, when given)."""
    for name, field in model.model_fields.items():
        if only is not None and name not in only:
            continue
        key = key_of(name, field)
        path = (*place.toml_path, key)
        if (table := _table_model(field)) is not None:
            header = f"[{'.'.join(path)}]"
            yield from section(table, Place(path, header, place.env), f"`{header}`", field)
        elif (models := _array_models(field)) is not None:
            header = f"[[{'.'.join(path)}]]"
            inner = Place(path, header, env=False)
            if len(models) == 1:
                yield from section(models[0], inner, f"`{header}`", field)
            else:
                yield from tagged_union(models, inner, field)


def tagged_union(models: list[type[BaseModel]], place: Place, field: FieldInfo) -> Iterator[str]:
    """An array of tables whose members differ by a tag (targets by ``driver``): the
    fields every member shares first, a table of which keys apply where, then each member."""
    tag = _tag_field(models)
    base = describe(_common_base(models))
    for model in models:
        describe(model)
    shared = set(base.model_fields)
    names = {m: _tag_value(m, tag) for m in models}
    yield f"## `{place.header}`: every {tag}"
    yield ""
    yield paragraph(field, place.header)
    yield ""
    for name, info in base.model_fields.items():
        if not _nested(info):
            yield from field_entry(name, info, place)
    yield from _applicability(models, names, tag)
    for model in models:
        own = {n: f for n, f in model.model_fields.items() if n not in shared and n != tag}
        yield f"## `{place.header}` with `{tag} = {json.dumps(names[model])}`"
        yield ""
        labelled = Place(place.toml_path, place.header, env=False, label=names[model])
        yield from field_entry(tag, model.model_fields[tag], labelled)
        for name, info in own.items():
            if not _nested(info):
                yield from field_entry(name, info, labelled)
        yield from nested_sections(model, labelled, {n for n, f in own.items() if _nested(f)})
    yield from nested_sections(base, place)


def _tag_field(models: list[type[BaseModel]]) -> str:
    for name, field in models[0].model_fields.items():
        if typing.get_origin(field.annotation) is Literal and all(
            typing.get_origin(m.model_fields[name].annotation) is Literal
            for m in models
            if name in m.model_fields
        ):
            return name
    raise TypeError(f"gen_config_docs: no tag field in {models}")


def _tag_value(model: type[BaseModel], tag: str) -> str:
    (value,) = typing.get_args(model.model_fields[tag].annotation)
    return str(value)


def _common_base(models: list[type[BaseModel]]) -> type[BaseModel]:
    for cls in models[0].__mro__:
        if all(issubclass(m, cls) for m in models) and is_section(cls):
            return cls
    raise TypeError(f"gen_config_docs: {models} share no model")


def _applicability(
    models: list[type[BaseModel]], names: dict[type[BaseModel], str], tag: str
) -> Iterator[str]:
    keys: dict[str, None] = {}
    for model in models:
        for name, field in model.model_fields.items():
            if name != tag:
                keys[key_of(name, field)] = None
    yield f"### Which keys apply to which {tag}"
    yield ""
    yield "| key | " + " | ".join(f"`{names[m]}`" for m in models) + " |"
    yield "| --- |" + " :-: |" * len(models)
    for key in keys:
        marks = [
            "✓" if key in {key_of(n, f) for n, f in m.model_fields.items()} else "" for m in models
        ]
        yield f"| `{key}` | " + " | ".join(marks) + " |"
    yield ""
    yield textwrap.fill(
        f"A key that does not apply to a target's {tag} is refused (`unknown setting`); "
        "keys with the same name can mean different things and have different defaults "
        f"per {tag}: see each {tag} below.",
        width=92,
    )
    yield ""


INTRO = """\
# Configuration reference

<!-- Generated by scripts/gen_config_docs.py from lbsync/config.py: do not edit this file,
     edit the field's docstring and run `.venv/bin/python scripts/gen_config_docs.py`. -->

lbsync reads one TOML file: `-c FILE`, else `$LBSYNC_CONFIG`, else
`/etc/lbsync/lbsync.toml`. Check it (and compile every template) with
`lbsync check -c FILE`. A bad setting gives one message naming the file, the setting and
the value, and exit code 1; a key lbsync does not know is refused, not ignored.

- **Relative paths** in the file (`state_dir`, the `[etcd]` files, template `src`) are
  resolved against the directory of the config file, so a config works from any cwd.
- **Durations** are written `"50ms"`, `"1.5s"`, `"2m"`, `"1h"`, or as a number of seconds.

## Environment overrides

Every setting outside the arrays of tables can be overridden by an `LBSYNC_…` variable:
`LBSYNC_` followed by the key's path in upper case, with `__` stepping into a table.

- `LBSYNC_ETCD__PREFIX=/other` sets `prefix` in `[etcd]`; `LBSYNC_STATE_DIR=/srv/lbsync`
  sets the top-level `state_dir`.
- A value that parses as JSON is taken as that JSON (`["http://a:2379"]`, `true`, `5`,
  `{"web": 2}`), anything else as a string. So a string setting whose value looks like a
  number must be given as a JSON string: `LBSYNC_HTTP__LISTEN='"9274"'`.
- A table-valued setting can be set whole (`LBSYNC_GUARD__MIN_INSTANCES='{"web": 2}'`)
  or one entry at a time (`LBSYNC_GUARD__MIN_INSTANCES__WEB=2`).
- **Not overridable**: the keys inside `[[target]]` and `[[target.template]]`. A variable
  cannot step into an array of tables (`LBSYNC_TARGET__0__NAME` is an error);
  `LBSYNC_TARGET='[…]'` would replace the whole list with JSON, which is possible but
  rarely what you want: targets belong in the file.
- `LBSYNC_CONFIG` names the file and is not a setting.
"""


def anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: ``[[target]]` with `driver = "nginx"``` →
    ``target-with-driver--nginx``."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def render() -> str:
    """The whole of docs/configuration.md, from the models as they are now."""
    top = Place(toml_path=(), header="", env=True)
    body = [
        *section(config.Settings, top, "Top level"),
        "## A complete lbsync.toml",
        "",
        f"`{EXAMPLE_CONFIG.relative_to(REPO)}`, which `lbsync check` accepts as it is:",
        "",
        "```toml",
        EXAMPLE_CONFIG.read_text(encoding="utf-8").rstrip("\n"),
        "```",
    ]
    contents = [f"- [{h[3:]}](#{anchor(h[3:])})" for h in body if h.startswith("## ")]
    return "\n".join([INTRO, "## Contents", "", *contents, "", *body]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is stale: run scripts/gen_config_docs.py")
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
