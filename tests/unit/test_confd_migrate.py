"""confd.toml and conf.d resources → lbsync.toml; whole-directory goldens; the CLI."""

from __future__ import annotations

import re
import shutil
import stat
from pathlib import Path

import pytest

from lbsync.catalog import Catalog
from lbsync.cli import main
from lbsync.confd import migrate
from lbsync.confd.resources import read_confd_settings, read_resource
from lbsync.config_file import load_settings
from lbsync.errors import ConversionError
from lbsync.model import KeyValue
from lbsync.render import Renderer
from lbsync.testing import assert_golden
from tests.confd.reference import FIXTURES, fixture_keys

GOLDEN = FIXTURES / "golden"


def confdir(tmp_path: Path, resource: str, template: str = "x\n", confd: str = "") -> Path:
    root = tmp_path / "confd"
    (root / "conf.d").mkdir(parents=True)
    (root / "templates").mkdir()
    (root / "conf.d" / "r.toml").write_text(resource)
    (root / "templates" / "t.tmpl").write_text(template)
    if confd:
        (root / "confd.toml").write_text(confd)
    return root


RESOURCE = '[template]\nsrc = "t.tmpl"\ndest = "/etc/x.conf"\nkeys = ["/a"]\n'


def test_the_fixture_directory_converts_to_the_golden_files(tmp_path: Path) -> None:
    migration = migrate.convert(FIXTURES)
    assert_golden(migration.config.replace(str(FIXTURES), "CONFDIR"), GOLDEN / "lbsync.toml")
    for name, text in migration.templates:
        assert_golden(text, GOLDEN / Path(name).name)


def test_the_written_config_is_one_lbsync_accepts(tmp_path: Path) -> None:
    config = migrate.write(migrate.convert(FIXTURES), tmp_path / "out")
    settings = load_settings(config)
    assert settings.etcd.prefix == "/production"
    assert settings.etcd.endpoints == ["http://127.0.0.1:2379"]
    haproxy = settings.target("haproxy")
    assert haproxy.driver == "command"
    assert haproxy.check_command == ["haproxy -c -f {staged}"]
    assert haproxy.reload_command == ["systemctl reload haproxy"]
    assert haproxy.shell is True
    assert haproxy.templates[0].mode == 0o640
    assert haproxy.templates[0].src == tmp_path / "out" / "templates" / "haproxy.j2"
    assert str(settings.target("nginx-site").templates[0].dest) == "/etc/nginx/conf.d/site.conf"


def test_confd_toml_backend_settings_become_etcd(tmp_path: Path) -> None:
    confd = (
        'backend = "etcdv3"\nnodes = ["10.0.0.1:2379", "https://10.0.0.2:2379"]\n'
        'scheme = "https"\nprefix = "app/"\nclient_cakeys = "/tls/ca.pem"\n'
        'client_cert = "/tls/c.pem"\nclient_key = "/tls/c.key"\nbasic_auth = true\n'
        'username = "confd"\npassword = "s3cret"\n'
    )
    root = confdir(tmp_path, RESOURCE, confd=confd)
    config = migrate.write(migrate.convert(root), tmp_path / "out")
    etcd = load_settings(config).etcd
    assert etcd.endpoints == ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
    assert etcd.prefix == "/app"
    assert (etcd.ca_file, etcd.cert_file, etcd.key_file) == (
        Path("/tls/ca.pem"),
        Path("/tls/c.pem"),
        Path("/tls/c.key"),
    )
    assert etcd.user == "confd"
    assert etcd.password_file == tmp_path / "out" / migrate.PASSWORD_NAME
    assert etcd.password_file.read_text() == "s3cret"
    assert stat.S_IMODE(etcd.password_file.stat().st_mode) == 0o600
    assert "s3cret" not in config.read_text()


def test_without_confd_toml_confd_defaults_apply(tmp_path: Path) -> None:
    settings = read_confd_settings(None)
    assert settings.endpoints == ("http://127.0.0.1:2379",)
    assert settings.prefix == "/"
    assert settings.user is None


@pytest.mark.parametrize(
    ("confd", "what"),
    [
        ('backend = "consul"', "backend 'consul': lbsync reads etcd (v3) only"),
        ('srv_record = "_etcd._tcp.example.com"', "srv_record: no lbsync equivalent"),
        ("nodes = 5", "nodes must be a list of strings"),
    ],
)
def test_confd_toml_that_lbsync_cannot_honour_is_refused(
    tmp_path: Path, confd: str, what: str
) -> None:
    root = confdir(tmp_path, RESOURCE, confd=confd)
    with pytest.raises(ConversionError, match=r"confd\.toml: ") as info:
        migrate.convert(root)
    assert what in str(info.value)


def test_resource_fields(tmp_path: Path) -> None:
    path = tmp_path / "web.toml"
    path.write_text(
        '[template]\nsrc = "a/web.tmpl"\ndest = "/etc/web.conf"\nkeys = ["/x", "/y"]\n'
        'prefix = "svc"\nmode = "0600"\nowner = "www-data"\ngid = 33\n'
        'check_cmd = "nginx -t -c {{ .src }} && test -s {{.src}}"\nreload_cmd = "kill -HUP 1"\n'
    )
    resource = read_resource(path)
    assert resource.name == "web"
    assert (resource.src, resource.dest, resource.keys) == (
        "a/web.tmpl",
        "/etc/web.conf",
        ("/x", "/y"),
    )
    assert resource.prefix == "/svc"
    assert resource.mode == 0o600
    assert resource.owner == "owner=www-data gid=33"
    assert resource.check_command() == "nginx -t -c {staged} && test -s {staged}"


@pytest.mark.parametrize(
    ("mode", "value"), [("0644", 0o644), ("0o750", 0o750), ("420", 420), (None, None)]
)
def test_mode_is_read_as_strconv_parseuint_base_0_does(
    tmp_path: Path, mode: str | None, value: int | None
) -> None:
    path = tmp_path / "r.toml"
    path.write_text(RESOURCE + (f'mode = "{mode}"\n' if mode else ""))
    assert read_resource(path).mode == value


@pytest.mark.parametrize(
    ("resource", "what"),
    [
        ('[template]\nsrc = "t.tmpl"\nkeys = ["/a"]\n', "dest: missing"),
        (RESOURCE + 'mode = "rw-r--r--"\n', "mode 'rw-r--r--' is not a file mode"),
        (RESOURCE + "keys2 = []\n", "keys2: unknown template key"),
        (RESOURCE + 'check_cmd = "check {{.src}} {{.dest}}"\n', "only {{.src}} can be translated"),
        ('src = "t.tmpl"\n', "expected one [template] table"),
        ("[template\n", "not valid TOML"),
    ],
)
def test_a_resource_lbsync_cannot_translate_is_refused_with_its_file(
    tmp_path: Path, resource: str, what: str
) -> None:
    root = confdir(tmp_path, resource)
    with pytest.raises(ConversionError, match=r"r\.toml: ") as info:
        migrate.convert(root)
    assert what in str(info.value)


def test_a_template_error_names_the_template_file(tmp_path: Path) -> None:
    root = confdir(tmp_path, RESOURCE, template='ok\n{{template "x"}}\n')
    with pytest.raises(ConversionError) as info:
        migrate.convert(root)
    assert str(info.value).startswith(f"{root / 'templates' / 't.tmpl'}:2:3: ")


def test_two_resources_sharing_a_template_get_one_file_each(tmp_path: Path) -> None:
    root = confdir(tmp_path, RESOURCE)
    other = RESOURCE.replace("/etc/x.conf", "/etc/y.conf") + 'prefix = "/other"\n'
    (root / "conf.d" / "s.toml").write_text(other)
    names = [name for name, _text in migrate.convert(root).templates]
    assert names == ["templates/t.j2", "templates/t.s.j2"]


def test_write_refuses_to_overwrite(tmp_path: Path) -> None:
    migration = migrate.convert(FIXTURES)
    migrate.write(migration, tmp_path)
    with pytest.raises(ConversionError, match="already exists"):
        migrate.write(migration, tmp_path)


def test_cli_converts_then_lbsync_check_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["migrate-confd", "--confdir", str(FIXTURES), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'lbsync.toml'} and 3 template(s)" in printed
    assert "note: nginx-upstreams.toml: uid=0 gid=0: lbsync keeps the owner" in printed
    assert main(["check", "-c", str(out / "lbsync.toml")]) == 0
    checked = capsys.readouterr().out.splitlines()
    assert len(checked) == 3
    assert all(line.startswith("ok  ") for line in checked)


def test_cli_reads_the_confd_toml_it_is_given(tmp_path: Path) -> None:
    root = tmp_path / "confd"
    shutil.copytree(FIXTURES, root)
    other = tmp_path / "other.toml"
    other.write_text('prefix = "/staging"\n')
    out = tmp_path / "out"
    assert (
        main(["migrate-confd", "--confdir", str(root), "--config", str(other), "--out", str(out)])
        == 0
    )
    assert load_settings(out / "lbsync.toml").etcd.prefix == "/staging"


def test_cli_error_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = confdir(tmp_path, RESOURCE, template="{{break}}")
    assert main(["migrate-confd", "--confdir", str(root), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lbsync: {root / 'templates' / 't.tmpl'}:1:3: {{{{break}}}}")
    assert not (tmp_path / "o").exists()


def test_converted_templates_render_the_same_in_the_sandbox(tmp_path: Path) -> None:
    """``[render] sandbox = true`` must not break a migrated config."""
    migrate.write(migrate.convert(FIXTURES), tmp_path)
    catalog = Catalog("/production")
    kvs = [KeyValue(key=k, value=v.encode(), mod_revision=1) for k, v in fixture_keys().items()]
    catalog.load(kvs, 1)
    snapshot = catalog.snapshot()
    for template in sorted((tmp_path / "templates").glob("*.j2")):
        plain = Renderer().render(template, snapshot)
        assert plain
        assert Renderer(sandbox=True).render(template, snapshot) == plain


def test_migrate_confd_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["migrate-confd", "--help"])
    assert info.value.code == 0
    assert "lbsync migrate-confd" in capsys.readouterr().out


def test_src_is_joined_to_templates_as_go_joins_it(tmp_path: Path) -> None:
    root = confdir(tmp_path, RESOURCE.replace('"t.tmpl"', '"/sub/../t.tmpl"'))
    ((name, text),) = migrate.convert(root).templates
    assert name == "templates/t.j2"
    assert "(templates/t.tmpl)" in text


def test_two_resources_whose_names_clean_alike_are_refused(tmp_path: Path) -> None:
    root = confdir(tmp_path, RESOURCE)
    (root / "conf.d" / "r!.toml").write_text(RESOURCE.replace("/etc/x.conf", "/etc/y.conf"))
    (root / "conf.d" / "r_.toml").write_text(RESOURCE.replace("/etc/x.conf", "/etc/z.conf"))
    with pytest.raises(ConversionError, match=re.escape("target name 'r_' is also r!.toml's")):
        migrate.convert(root)
