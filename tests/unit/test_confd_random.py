"""Random differential tests: seeded random Go templates, built from the translated subset
with random whitespace and trim markers, must render Go's bytes through lbsync.

The generator is deterministic (fixed seeds), so a failure names the seed and always
reproduces; it writes well-typed templates, so Go renders each one."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lbsync.confd import migrate
from lbsync.confd.resources import Resource
from tests.confd.reference import GoRender, go_render, render_lbsync

__all__ = ["go_render"]  # the fixture, imported to be used here

KEYS = {
    "/svc/web/a": "10.0.0.1:80",
    "/svc/web/b": "10.0.0.2:80",
    "/svc/api/x": "10.0.1.1:9000",
    "/svc/db/m/1": "10.0.2.1:5432",
    "/cfg/name": "Demo Site",
    "/cfg/port": "8080",
    "/cfg/web": '{"balance": "least_conn", "weight": 3, "tags": ["a", "b"], "on": true}',
    "/cfg/empty": "",
}
# ("a {" right before "{{" would be an error in Go too: "{{{" starts an action at the first
# two braces.)
_TEXTS = ["", " ", "\n", "  ", "\t", "\n\n  ", "x", "a {\n", "}\n", "# c\n", " ; ", "{ }", "%"]
_STRINGS = ['"a"', '"/cfg/name"', '"x y"', "`raw`", '""']


class _Gen:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.count = 0

    def pick(self, items: list[str]) -> str:
        return self.rng.choice(items)

    def tag(self, body: str) -> str:
        left = self.pick(["", "", "- "])
        right = self.pick(["", "", " -"])
        return "{{" + left + body + right + "}}"

    def string(self, scope: dict[str, str]) -> str:
        options = [
            self.pick(_STRINGS),
            '(getv "/cfg/name")',
            '(getv "/cfg/missing" "dflt")',
            '(printf "%s-%d" "p" 7)',
            '(toUpper "mixed Case")',
            '(base "/a/b")',
            '(join (split "a,b,c" ",") "+")',
        ]
        options += [name for name, kind in scope.items() if kind == "str"]
        for name, kind in scope.items():
            if kind == "kv":
                options += [f"{name.rstrip('.')}.Value", f"{name.rstrip('.')}.Key"]
        return self.pick(options)

    def number(self, scope: dict[str, str]) -> str:
        options = ["1", "42", "-3", '(atoi (getv "/cfg/port"))', '(len (getvs "/svc/*/*"))']
        options += [f"(add {self.pick(['1', '2'])} 3)"]
        options += [name for name, kind in scope.items() if kind == "int"]
        return self.pick(options)

    def condition(self, scope: dict[str, str]) -> str:
        return self.pick(
            [
                "true",
                "false",
                f"(eq {self.string(scope)} {self.string(scope)})",
                f"(lt {self.number(scope)} {self.number(scope)})",
                f"(and {self.string(scope)} {self.number(scope)})",
                f"(or {self.string(scope)} {self.string(scope)})",
                f'(exists "/cfg/{self.pick(["name", "nope"])}")',
                '(getv "/cfg/empty")',
                f"(not {self.number(scope)})",
            ]
        )

    def value(self, scope: dict[str, str]) -> str:
        return self.pick(
            [
                self.string(scope),
                self.number(scope),
                self.condition(scope),
                '(json (getv "/cfg/web"))',
                '(json (getv "/cfg/web")).weight',
                '(getvs "/svc/web/*")',
                '(get "/cfg/port")',
                '(printf "%5s|%-4d|%v" "ab" 7 (split "x,y" ","))',
                ".",
                *[name for name, kind in scope.items() if kind in ("kv", "int")],
            ]
        )

    def fresh(self, stem: str) -> str:
        self.count += 1
        return f"${stem}{self.count}"

    def block(self, scope: dict[str, str], depth: int) -> str:
        parts = []
        for _ in range(self.rng.randint(1, 4)):
            parts.append(self.pick(_TEXTS))
            parts.append(self.item(scope, depth))
        parts.append(self.pick(_TEXTS))
        return "".join(parts)

    def item(self, scope: dict[str, str], depth: int) -> str:
        kinds = ["output", "output", "set", "comment"]
        if depth < 3:
            kinds += ["if", "range_kv", "range_str", "with"]
        kind = self.pick(kinds)
        if kind == "output":
            return self.tag(self.value(scope))
        if kind == "comment":
            return self.tag("/* note */")
        if kind == "set":
            name = self.fresh("v")
            choice = self.pick(["str", "int"])
            value = self.string(scope) if choice == "str" else self.number(scope)
            scope[name] = choice
            return self.tag(f"{name} := {value}")
        inner = dict(scope)
        if kind == "if":
            head = self.tag(f"if {self.condition(scope)}")
            middle = ""
            if self.rng.random() < 0.5:
                middle = self.tag(f"else if {self.condition(scope)}")
                middle += self.block(dict(scope), depth + 1)
            if self.rng.random() < 0.5:
                middle += self.tag("else") + self.block(dict(scope), depth + 1)
            return head + self.block(inner, depth + 1) + middle + self.tag("end")
        if kind == "range_kv":
            name = self.fresh("kv")
            inner[name] = inner["."] = "kv"
            source = self.pick(['gets "/svc/*/*"', 'gets "/svc/web/*"', 'gets "/none/*"'])
            index = self.fresh("i")
            head = self.tag(f"range {index}, {name} := {source}")
            inner[index] = "int"
            tail = (
                self.tag("else") + self.block(dict(scope), depth + 1)
                if self.rng.random() < 0.3
                else ""
            )
            return head + self.block(inner, depth + 1) + tail + self.tag("end")
        if kind == "range_str":
            name = self.fresh("s")
            inner[name] = inner["."] = "str"
            source = self.pick(['lsdir "/svc"', 'ls "/cfg"', 'getvs "/svc/*/*"', 'split "a,b" ","'])
            return (
                self.tag(f"range {name} := {source}")
                + self.block(inner, depth + 1)
                + self.tag("end")
            )
        name = self.fresh("w")
        head = self.tag(f"with {name} := {self.string(scope)}")
        inner[name] = inner["."] = "str"
        tail = (
            self.tag("else") + self.block(dict(scope), depth + 1) if self.rng.random() < 0.5 else ""
        )
        return head + self.block(inner, depth + 1) + tail + self.tag("end")


@pytest.mark.parametrize("seed", range(150))
def test_random_templates_render_the_bytes_go_does(
    go_render: GoRender, tmp_path: Path, seed: int
) -> None:
    source = _Gen(seed).block({}, 0)
    original = tmp_path / "t.tmpl"
    original.write_text(source)
    resource = Resource(tmp_path / "r.toml", "t.tmpl", "/x", ("/",), "/", None, None, None, None)
    converted = tmp_path / "t.j2"
    converted.write_text(migrate.convert_template(source, str(original), resource))
    go = go_render(original, KEYS, "/", ["/"])
    assert render_lbsync(converted, KEYS, "/") == go, f"seed {seed}: {source!r}"
