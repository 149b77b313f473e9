"""Differential tests: the same keys through Go's text/template (confd's way, with the
original template) and through lbsync (the converted one) must give the same bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from lbsync.confd import migrate
from lbsync.confd.resources import Resource
from lbsync.confd.store import go_path_join
from lbsync.errors import RenderError
from tests.confd.reference import FIXTURES, GoRender, fixture_keys, go_render, render_lbsync

__all__ = ["go_render"]  # the fixture, imported to be used here

KEYS = {
    "/app/upstreams/web/a": "10.0.0.1:8080",
    "/app/upstreams/web/b": "10.0.0.2:8080",
    "/app/upstreams/api/x": "10.0.1.1:9000",
    "/app/upstreams/api/deep/y": "10.0.1.2:9000",
    "/app/config/web": '{"balance": "least_conn", "port": 8080, "ratio": 0.25, "big": 1e7,'
    ' "tags": ["a", "b"], "on": true, "none": null, "nested": {"k": "v"}}',
    "/app/config/list": '["x", 1, 2.5, false]',
    "/app/config/name": "Example",
    "/app/config/empty": "",
    "/app/config/n": "42",
    "/app/config/csv": "b,a,c",
    "/app/config/b64": "aGVsbG8gd29ybGQ=",
    "/app/config/bool": "TRUE",
    "/app/config/odd": "{% raw %} {{ not jinja }} {# nor this #} \\ '\"",
    "/appendix/not/watched": "x",
}


def _resource(tmp_path: Path, prefix: str = "/", keys: tuple[str, ...] = ("/",)) -> Resource:
    return Resource(tmp_path / "r.toml", "t.tmpl", "/x", keys, prefix, None, None, None, None)


def both(go_render: GoRender, tmp_path: Path, source: str, **kw: str) -> tuple[bytes, bytes]:
    """Render ``source`` with Go (original) and lbsync (converted), lbsync prefix /app."""
    resource = _resource(tmp_path)
    original = tmp_path / "t.tmpl"
    original.write_text(source)
    converted = tmp_path / "t.j2"
    converted.write_text(migrate.convert_template(source, str(original), resource))
    go = go_render(original, KEYS, go_path_join("/app", resource.prefix), resource.keys)
    return go, render_lbsync(converted, KEYS, "/app")


CONSTRUCTS = {
    "text only": "plain text\n  with lines\n\n",
    "markup-like text": "a {# b #} {% c %} { {\n} }}\r\nend {",
    "action alone on a line": 'a\n{{getv "/config/name"}}\n  {{getv "/config/n"}}  \nb\n',
    "trim markers": 'a  \n\t{{- getv "/config/name" -}}\n  b\n{{- "x"}}  {{"y" -}}  \n',
    "comments": "a\n{{/* c */}}\nb {{- /* trimmed */ -}} c\n  {{- /* left */}} d\n"
    "{{- /* multi\n line */\t-}}\n e {{/* right */ -}}\n\tf\n",
    "if alone on lines": "x\n{{if true}}\nyes\n{{end}}\ny\n"
    "  {{if false}}no{{else}}  else\n{{end}}\n",
    "else if chain": '{{$n := atoi (getv "/config/n")}}'
    "{{if lt $n 10}}small{{else if lt $n 100}}medium{{else}}large{{end}}\n",
    "if declares": '{{if $v := getv "/config/name"}}[{{$v}}]{{end}}\n',
    "range gets": '{{range gets "/upstreams/*/*"}}{{.Key}}={{.Value}}\n{{end}}',
    "nested range lsdir": '{{range $s := lsdir "/upstreams"}}{{$s}}:\n'
    '{{range $i, $kv := gets (printf "/upstreams/%s/*" $s)}}  {{$i}} {{$kv.Value}}\n'
    "{{end}}{{end}}",
    "range else": '{{range getvs "/nothing/*"}}x{{else}}empty{{end}}\n',
    "range over map": '{{range $k, $v := json (getv "/config/web")}}{{$k}}={{$v}};{{end}}\n'
    '{{range json (getv "/config/web")}}{{.}}|{{end}}\n',
    "ls and lsdir": '{{ls "/"}} {{lsdir "/"}} {{ls "/upstreams"}} {{lsdir "/upstreams/api"}}'
    ' {{ls "/config/web"}} {{ls "/missing"}}\n',
    "exists and getv default": '{{exists "/config/n"}} {{exists "/nope"}}'
    ' {{getv "/nope" "dflt"}} {{getv "/config/empty" "dflt"}}|\n',
    "with": '{{with getv "/config/empty"}}has{{else}}empty{{end}} '
    '{{with $x := getv "/config/name"}}{{.}}={{$x}}{{end}}\n',
    "variables shadowing": "{{$x := 1}}{{range seq 1 2}}{{$x := .}}{{$x}}{{end}}{{$x}}"
    "{{with 5}}{{$x := 9}}{{$x}}{{end}}{{$x}}\n",
    "root and dot": "{{$}} {{.}} {{range seq 1 2}}{{$}}{{end}}\n",
    "comparisons": '{{eq 1 1}} {{eq "a" "b" "a"}} {{ne 1 2}} {{lt 1 2}} {{le 2 2}}'
    ' {{gt "b" "a"}} {{ge 1 2}} {{and 1 0}} {{or 0 "" "z"}} {{not 0}} {{and 1 2}}\n',
    "len and index": '{{len "héllo"}} {{len (getvs "/upstreams/*/*")}}'
    ' {{index (split "a,b,c" ",") 1}} {{index (json (getv "/config/web")) "balance"}}'
    ' {{index (json (getv "/config/web")) "missing"}}\n',
    "printf": '{{printf "%s:%d" "h" 80}} {{printf "%5s|%-5s|%05d" "a" "b" 42}}'
    ' {{printf "%q %v %t %x %X %.2f" "q\\"" 1.5 true 255 "hi" 3.14159}}'
    ' {{printf "%d" "str"}} {{printf "%s"}} {{printf "%s" "a" "b"}} {{printf "100%%"}}\n',
    "printing values": '{{json (getv "/config/web")}}\n{{jsonArray (getv "/config/list")}}\n'
    '{{(json (getv "/config/web")).big}} {{(json (getv "/config/web")).ratio}}'
    ' {{(json (getv "/config/web")).none}} {{(json (getv "/config/web")).nested.k}}'
    " {{get \"/config/n\"}} {{1.0}} {{-3}} {{0x1F}} {{'a'}}\n",
    "field chains": '{{(get "/config/name").Value}} {{with get "/config/n"}}{{.Key}}{{end}}'
    ' {{(json (getv "/config/web")).tags}}\n',
    "pipelines": '{{getv "/config/name" | toUpper}} {{"x" | printf "%s-%s" "y"}}'
    ' {{getv "/config/csv" | printf "%q"}} {{join (split (getv "/config/csv") ",") "+"}}\n',
    "string helpers": '{{base "/a/b/"}} {{base ""}} {{dir "/a/b"}} {{dir "a"}}'
    ' {{toLower "AbC"}} {{contains "abc" "b"}} {{replace "aaa" "a" "b" 2}}'
    ' {{replace "aaa" "a" "b" -1}} {{trimSuffix "a.conf" ".conf"}}'
    ' {{split "abc" ""}} {{getenv "LBSYNC_SURELY_UNSET" "fallback"}}\n',
    "ls quirks": '{{ls "/upstreams/"}} {{lsdir "/upstreams/"}} {{ls "/config/n"}}'
    ' {{ls "/upstreams/api/deep"}} {{lsdir "/up"}} {{ls "/up"}} {{lsdir "/upstreams/api"}}'
    ' {{ls "upstreams"}} {{lsdir ""}}\n',
    "glob patterns": '{{getvs "/upstreams/web/[ab]"}} {{getvs "/upstreams/*/?"}}'
    ' {{getvs "/upstreams/[^w]*/*"}} {{getvs "/upstreams/a[p-q]i/*"}} {{getvs "/upstreams/\\a*/*"}}'
    ' {{getvs "*"}} {{getvs "/*/*/*/*"}}\n',
    "printf verbs": '{{printf "%6.2f|%-8d|%+d|%x|%X|%5.1s|%-4v|%3d" 3.14159 42 7 -255 "Hi" "abc"'
    " true 12345}}"
    ' {{printf "%05s|%-05d|%05d|%+.2f|%+5d|%f|%5t|%05v|%q|%-5q|%s|%d|%s|%d|%v|%s"'
    ' "ab" 42 -42 3.14159 7 3 true "z" "a\\x01b\\u00e9\\U0001F600\\u200b\\a" "x"'
    ' (jsonArray "[1,\\"a\\",null]") (seq 1 2) (get "/config/n") (json "{\\"a\\":1}")'
    ' (json "{\\"a\\":[true]}") nil}}'
    ' {{printf "%v %v %s" (split "a,b" ",") (gets "/config/n") (split "x" ",")}}\n',
    "define and template": '{{define "server"}}    server {{.Value}};\n{{end}}'
    'upstream web {\n{{range gets "/upstreams/web/*"}}{{template "server" .}}{{end}}}\n'
    '{{- define "list"}}{{range $i, $e := .}}{{if $i}},{{end}}{{$e}}{{end}}{{end}}\n'
    '[{{template "list" (getvs "/upstreams/*/*")}}] [{{template "list" (split "" ",")}}]\n'
    '{{define "nil"}}<{{.}}|{{$}}>{{end}}{{template "nil"}} {{template "later" 5}}\n'
    '{{define "later"}}{{if gt . 0}}{{.}}{{template "later" (sub . 1)}}{{end}}{{end}}'
    '{{block "inline" (getv "/config/name")}}[{{.}} {{len (getvs "/upstreams/api/*")}}]{{end}}\n',
    "unicode": '{{toUpper "straße ǆ é"}} {{toLower "İSTANBUL ǅ É"}} {{len "é"}}'
    ' {{split "é,ß" ""}} {{printf "%q|%5s|%x" "é\\t" "é" "é"}}\n',
    "numbers": "{{add 1 2}} {{sub 1 2}} {{mul 3 4}} {{div -7 2}} {{mod -7 2}} {{seq 3 5}}"
    ' {{seq 2 1}} {{atoi "-12"}}\n',
    "collections": '{{map "a" 1 "b" "x"}} {{reverse (getvs "/upstreams/*/*")}}'
    ' {{sortByLength (split "ccc,a,bb" ",")}}'
    ' {{range sortKVByLength (gets "/upstreams/api/*")}}{{.Key}} {{end}}\n',
    "encodings": '{{base64Encode "hi there"}} {{base64Decode (getv "/config/b64")}}'
    ' {{parseBool (getv "/config/bool")}} {{fileExists "/"}} {{fileExists "/nonexistent"}}\n',
    "strings and escapes": '{{"tab\\there\\n"}}{{`raw \\n`}} {{getv "/config/odd"}}\n',
    "whitespace around blocks": 'list:\n  {{- range getvs "/upstreams/web/*"}}\n    - {{.}}\n'
    '  {{- end}}\n{{range $i, $v := getvs "/upstreams/web/*" -}}\n'
    "  {{$i}}: {{$v}}\n{{end -}}\nend\n",
}


@pytest.mark.parametrize("name", sorted(CONSTRUCTS))
def test_construct_renders_the_bytes_go_does(
    go_render: GoRender, tmp_path: Path, name: str
) -> None:
    go, lbsync = both(go_render, tmp_path, CONSTRUCTS[name])
    assert lbsync == go


def test_resource_prefix_and_keys_select_what_confd_loads(
    go_render: GoRender, tmp_path: Path
) -> None:
    """Only keys under prefix+key reach the template, named relative to the prefix."""
    source = '{{range gets "/*/*"}}{{.Key}}={{.Value}}\n{{end}}{{ls "/"}}\n'
    resource = _resource(tmp_path, prefix="/upstreams", keys=("/web", "/ap"))
    original = tmp_path / "t.tmpl"
    original.write_text(source)
    converted = tmp_path / "t.j2"
    converted.write_text(migrate.convert_template(source, str(original), resource))
    go = go_render(original, KEYS, "/app/upstreams", resource.keys)
    assert b"/web/a=10.0.0.1:8080" in go
    assert b"config" not in go
    assert render_lbsync(converted, KEYS, "/app") == go


def test_the_fixture_directory_renders_what_confd_wrote(
    go_render: GoRender, tmp_path: Path
) -> None:
    """The realistic confd setup: every resource, converted, gives confd's bytes."""
    migration = migrate.convert(FIXTURES)
    migrate.write(migration, tmp_path / "out")
    keys = fixture_keys()
    resources = {r.src: r for r in migrate.read_resources(FIXTURES)}
    assert len(migration.templates) == len(resources) == 3
    for name, _text in migration.templates:
        resource = resources[Path(name).stem + ".tmpl"]
        prefix = go_path_join("/production", resource.prefix)
        go = go_render(FIXTURES / "templates" / resource.src, keys, prefix, resource.keys)
        assert go.strip(), f"{resource.src} rendered nothing under Go"
        assert render_lbsync(tmp_path / "out" / name, keys, "/production") == go, resource.src


@pytest.mark.parametrize(
    "source",
    [
        '{{getv "/nope"}}',
        '{{(get "/nope").Value}}',
        '{{eq 1 "a"}}',
        '{{atoi "4 2"}}',
        '{{index (split "a" ",") 5}}',
        "{{div 1 0}}",
        '{{json "[1]"}}',
        '{{json "{\\"a\\": 1e400}"}}',
        '{{jsonArray "[NaN]"}}',
        '{{base64Decode "%%"}}',
        '{{parseBool "yes"}}',
        '{{range getv "/config/name"}}{{end}}',
        '{{(getv "/config/name").Key}}',
    ],
)
def test_what_go_refuses_to_render_lbsync_refuses_too(
    go_render: GoRender, tmp_path: Path, source: str
) -> None:
    with pytest.raises(AssertionError, match="Go refused"):
        both(go_render, tmp_path, source)
    converted = tmp_path / "t.j2"
    with pytest.raises(RenderError, match=r"t\.j2"):
        render_lbsync(converted, KEYS, "/app")


_AROUND = ["", " ", "\n", "  \n\t ", "x\n  ", "\n\n"]
_ACTIONS = [
    "{{L 7 R}}",
    "{{L if true R}}\n  a\n{{L end R}}",
    "{{L if false R}}a{{L else if true R}}\n b \n{{L else R}}c{{L end R}}",
    "{{L range seq 1 2 R}}\n  r{{L . R}}\n{{L end R}}",
    "{{L /* c */ R}}",
    "{{L $v := 1 R}}",
    "{{L with 0 R}}w{{L else R}}\n e\n{{L end R}}",
]


def test_whitespace_around_every_kind_of_action_is_gos(go_render: GoRender, tmp_path: Path) -> None:
    """Every action kind, with and without each trim marker, between texts of every shape
    (empty, spaces, newlines, lines holding only the action): one template, Go's bytes."""
    cases = []
    for action in _ACTIONS:
        for left in ("", "- "):
            for right in ("", " -"):
                tagged = action.replace("{{L ", "{{" + left).replace(" R}}", right + "}}")
                for before in _AROUND:
                    for after in _AROUND:
                        cases.append(f"#{before}{tagged}{after}#")
    go, lbsync = both(go_render, tmp_path, "\n".join(cases) + "\n")
    assert go.count(b"#") == 2 * len(cases) == 2 * 7 * 4 * 36
    assert lbsync == go
