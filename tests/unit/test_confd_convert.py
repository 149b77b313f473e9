"""The Go-template → Jinja2 converter, construct by construct, and its refusals."""

from __future__ import annotations

import jinja2
import pytest

from lbsync.confd.functions import Functions
from lbsync.confd.gotemplate import parse
from lbsync.confd.jinja import emit
from lbsync.errors import ConversionError
from lbsync.render import _ENV_OPTIONS

KEYS = {"/svc/web/a": "10.0.0.1:80", "/svc/web/b": "10.0.0.2:80", "/name": "demo"}


def convert(source: str) -> str:
    return emit(parse(source, "t.tmpl"), prefix="/", keys=["/"], origin="t.tmpl")


def body(source: str) -> str:
    """The converted template without its two header tags."""
    return convert(source).split("+%}", 1)[1]


def render(source: str) -> str:
    env = jinja2.Environment(**_ENV_OPTIONS)
    return env.from_string(convert(source)).render(confd=Functions(lambda: KEYS))


@pytest.mark.parametrize(
    ("source", "jinja"),
    [
        ("plain\n", "plain\n"),
        ('{{getv "/name"}}', "{{ kv.getv('/name') }}"),
        ('{{json "{}"}}', "{{ confd.text(confd.json('{}')) }}"),
        ("{{.}}", "{{ confd.text(none) }}"),
        ("{{$}}", "{{ confd.text(none) }}"),
        ("{{$x := 1}}{{$x}}", "{%+ set var_x_1 = 1 +%}{{ var_x_1 }}"),
        ("{{$x := true}}{{$x}}", "{%+ set var_x_1 = true +%}{{ confd.text(var_x_1) }}"),
        ("{{if true}}a{{end}}", "{%+ if true +%}a{%+ endif +%}"),
        (
            "{{if 1}}a{{else if 2}}b{{else}}c{{end}}",
            "{%+ if 1 +%}a{%+ elif 2 +%}b{%+ else +%}c{%+ endif +%}",
        ),
        (
            '{{range ls "/"}}{{.}}{{end}}',
            "{%+ for dot_1 in confd.elements(kv.ls('/')) +%}{{ dot_1 }}{%+ endfor +%}",
        ),
        (
            '{{range $i, $e := ls "/"}}{{$i}}{{$e}}{{else}}none{{end}}',
            "{%+ for var_i_2, dot_1 in confd.pairs(kv.ls('/')) +%}{{ var_i_2 }}{{ dot_1 }}"
            "{%+ else +%}none{%+ endfor +%}",
        ),
        (
            '{{range $k, $v := json "{}"}}{{$k}}{{$v}}{{end}}',
            "{%+ for var_k_2, dot_1 in confd.pairs(confd.json('{}')) +%}"
            "{{ confd.text(var_k_2) }}{{ confd.text(dot_1) }}{%+ endfor +%}",
        ),
        (
            '{{with getv "/name"}}{{.}}{{end}}',
            "{%+ set dot_1 = kv.getv('/name') +%}{%+ if dot_1 +%}{{ dot_1 }}{%+ endif +%}",
        ),
        ('{{(get "/name").Value}}', "{{ kv.get('/name').Value }}"),
        ('{{(json "{}").Value}}', "{{ confd.text(confd.field(confd.json('{}'), 'Value')) }}"),
        (
            '{{range gets "/*"}}{{if eq .Key "/a"}}{{.Value}}{{end}}{{end}}',
            "{%+ for dot_1 in confd.elements(kv.gets('/*')) +%}{%+ if (dot_1.Key == '/a') +%}"
            "{{ dot_1.Value }}{%+ endif +%}{%+ endfor +%}",
        ),
        ('{{eq 1 "a"}}{{lt 1 2}}', "{{ confd.text(confd.eq(1, 'a')) }}{{ confd.text((1 < 2)) }}"),
        ('{{"a" | printf "%s-%s" "b"}}', "{{ confd.printf('%s-%s', 'b', 'a') }}"),
        (
            "{{and 1 0 2}}{{or 0 1}}{{not 1}}",
            "{{ (1 and 0 and 2) }}{{ (0 or 1) }}{{ confd.text((not 1)) }}",
        ),
        (
            "{{-3}}{{1.5}}{{0x10}}{{'a'}}{{`r\\n`}}",
            "{{ (-3) }}{{ confd.text(1.5) }}{{ 16 }}{{ 97 }}{{ 'r\\\\n' }}",
        ),
        ("a  {{- 1 -}}  \n b", "a{{ 1 }}b"),
        ("a {{/* note */}} b", "a  b"),
        ("x {{- /* note */ -}} y", "xy"),
        ("{% raw %}", "{{ '{% raw %}' }}"),
        ("location {\n  {{1}}", "location {\n  {{ 1 }}"),
        ("location {{1}}{", "location {{ 1 }}{{ '{' }}"),
        ("a\r\nb", "{{ 'a\\r\\nb' }}"),
    ],
)
def test_each_construct_has_one_translation(source: str, jinja: str) -> None:
    assert body(source) == jinja


def test_every_statement_tag_turns_off_trim_and_lstrip() -> None:
    jinja = convert('{{if 1}}\n  {{range ls "/"}}\n{{end}}\n{{end}}\n')
    tags = [part.split("%}")[0] for part in jinja.split("{%")[1:]]
    assert tags
    assert all(tag.startswith("+ ") and tag.endswith(" +") for tag in tags)


def test_lines_holding_only_an_action_keep_their_newlines() -> None:
    assert render("a\n{{if true}}\nb\n{{end}}\n  {{$x := 1}}\nc\n") == "a\n\nb\n\n  \nc\n"


def test_nested_ranges_over_lsdir_and_gets() -> None:
    source = (
        '{{range $s := lsdir "/svc"}}{{$s}}:'
        '{{range gets (printf "/svc/%s/*" $s)}} {{base .Key}}={{.Value}}{{end}}\n{{end}}'
    )
    assert render(source) == "web: a=10.0.0.1:80 b=10.0.0.2:80\n"


def test_a_variable_declared_inside_a_block_does_not_shadow_the_outer_one() -> None:
    assert render("{{$x := 1}}{{if true}}{{$x := 2}}{{$x}}{{end}}{{$x}}") == "21"


def test_variable_scope_ends_with_its_block() -> None:
    with pytest.raises(ConversionError, match="undefined variable '\\$x'"):
        parse("{{if true}}{{$x := 1}}{{end}}{{$x}}", "t.tmpl")


@pytest.mark.parametrize(
    ("source", "where", "what"),
    [
        ('{{if 1}}{{define "x"}}{{end}}{{end}}', "1:11", "{{define}} below the top level"),
        ('{{define "x"}}{{define "y"}}{{end}}{{end}}', "1:17", "{{define}} below the top level"),
        ('{{define "x"}}a{{end}}{{define "x"}}b{{end}}', "1:25", "template 'x' is defined twice"),
        ('{{define "x" .}}{{end}}', "1:14", "{{define}} takes a name only"),
        ("{{define x}}{{end}}", "1:3", "{{define}} needs a quoted name"),
        ('{{block "x"}}{{end}}', "1:3", "{{block}} needs a pipeline"),
        ('{{define "x"}}a{{else}}b{{end}}', "1:16", "{{else}} in {{define}}"),
        ('a\n  {{template "x"}}', "2:5", "no template 'x' is defined"),
        ('{{with 1}}{{block "x" .}}{{end}}{{end}}', "1:13", "{{block}} below the top level"),
        ('{{range ls "/"}}{{break}}{{end}}', "1:19", "{{break}} is outside the subset"),
        ("{{$x := 1}}\n{{$x = 2}}", "2:6", "assigning an existing variable"),
        ("{{datetime}}", "1:3", "'datetime': the time of rendering"),
        ('{{lookupIP "a"}}', "1:3", "'lookupIP'"),
        ('x\n{{html "a"}}', "2:3", "function 'html' is outside the subset"),
        ('{{(get "/a").Value.Format "x"}}', "1:3", "calling a method"),
        ('{{.Key "x"}}', "1:3", "calling a method"),
        ("{{$nope}}", "1:3", "undefined variable '$nope'"),
        ("{{if true}}a", "1:1", "{{if}} has no {{end}}"),
        ("{{end}}", "1:1", "unexpected {{end}}"),
        ("{{with 1}}a{{else with 2}}b{{end}}", "1:12", "{{else with}} is outside"),
        ("{{if 1}}a{{else}}b{{else}}c{{end}}", "1:19", "a second {{else}}"),
        ('{{getv "a"', "1:1", "unclosed action"),
        ("{{/* open", "1:1", "unclosed comment"),
        ("{{ /* spaced */ }}", "1:4", "unexpected '/'"),
        ("{{/* c */ 1}}", "1:8", "comment not closed"),
        ("{{not 1 2}}", "1:3", "wrong number of arguments for not"),
        ("{{eq 1}}", "1:3", "wrong number of arguments for eq"),
        ('{{getv "a" | 1}}', "1:14", "calling a method or passing arguments to a non-function"),
        ("{{ ; }}", "1:4", "unexpected ';'"),
        ('{{"\\101"}}', "1:3", "octal escapes"),
        ("{{}}", "1:1", "empty action"),
        ("{{if nil}}a{{end}}", "1:6", "nil is not a command"),
        ('{{printf "%e" 1.5}}', "1:3", "printf '%e': verb %e is outside what lbsync formats"),
        ('{{printf "%#x" 1}}', "1:3", "flag '#' in %x"),
        ('{{printf "% d" 1}}', "1:3", "flag ' ' in %d"),
        ('{{printf "%.3d" 1}}', "1:3", "a precision in %d"),
        ('{{printf "%[1]s" 1}}', "1:3", "verb %["),
        ('{{printf "%*d" 1 2}}', "1:3", "verb %*"),
        ('{{printf "%+q" "a"}}', "1:3", "flag '+' in %q"),
        ('{{printf "50%"}}', "1:3", "a '%' at the end"),
    ],
)
def test_an_unsupported_construct_names_file_line_column_and_construct(
    source: str, where: str, what: str
) -> None:
    with pytest.raises(ConversionError) as info:
        parse(source, "/etc/confd/templates/t.tmpl")
    message = str(info.value)
    assert message.startswith(f"/etc/confd/templates/t.tmpl:{where}: "), message
    assert what in message
