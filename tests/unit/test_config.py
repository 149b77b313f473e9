from pathlib import Path

import pytest

from lbsync.config import parse_duration
from lbsync.config_file import load_settings
from lbsync.errors import ConfigError

GOOD = """
[etcd]
endpoints = ["http://127.0.0.1:2379"]
prefix = "/lbsync"

[wait]
min = "50ms"
max = "1s"

[[target]]
name = "nginx"
driver = "nginx"
config = "/etc/nginx/nginx.conf"
pid_file = "/run/nginx.pid"

  [[target.template]]
  src = "templates/nginx/upstreams.conf.j2"
  dest = "/etc/nginx/conf.d/lbsync-upstreams.conf"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lbsync.toml"
    path.write_text(text)
    return path


def test_issue_example_loads_and_resolves_template_paths(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD), environ={})
    target = settings.targets[0]
    assert target.driver == "nginx"
    assert target.templates[0].src == tmp_path / "templates/nginx/upstreams.conf.j2"
    assert settings.wait.min == 0.05
    assert settings.wait.max == 1.0


def test_env_overrides_nested_values(tmp_path: Path) -> None:
    env = {
        "LBSYNC_ETCD__PREFIX": "/other",
        "LBSYNC_ETCD__ENDPOINTS": '["http://10.0.0.1:2379", "http://10.0.0.2:2379"]',
        "LBSYNC_WAIT__MAX": "2s",
        "UNRELATED": "x",
    }
    settings = load_settings(write(tmp_path, GOOD), environ=env)
    assert settings.etcd.prefix == "/other"
    assert len(settings.etcd.endpoints) == 2
    assert settings.wait.max == 2.0


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            ('min = "50ms"', 'min = "soon"'),
            "wait.min: expected a duration like '50ms' or '2s', got 'soon'",
        ),
        (('pid_file = "/run/nginx.pid"', "pid_file = 5"), "target[0] (name='nginx').pid_file"),
        (('driver = "nginx"', 'driver = "apache"'), "target[0] (name='nginx')"),
        (
            ('dest = "/etc/nginx/conf.d/lbsync-upstreams.conf"', 'dest = "relative.conf"'),
            "dest must be an absolute path, got 'relative.conf'",
        ),
        (
            ('prefix = "/lbsync"', 'prefix = "/lbsync"\nsurprise = 1'),
            "etcd.surprise: unknown setting",
        ),
        (('endpoints = ["http://127.0.0.1:2379"]', 'endpoints = ["ftp:/x y"]'), "etcd.endpoints"),
        (('min = "50ms"', 'min = "5s"'), "min (5.0s) is longer than max (1.0s)"),
    ],
)
def test_bad_values_name_file_field_and_value(
    tmp_path: Path, edit: tuple[str, str], expected: str
) -> None:
    path = write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    message = str(info.value)
    assert message.startswith(str(path))
    assert expected in message


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[etcd\n"), environ={})
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_duplicate_target_names_rejected(tmp_path: Path) -> None:
    doubled = GOOD + GOOD[GOOD.index("[[target]]") :].replace("lbsync-upstreams", "other")
    with pytest.raises(ConfigError, match="two targets are named 'nginx'"):
        load_settings(write(tmp_path, doubled), environ={})


@pytest.mark.parametrize(
    ("raw", "seconds"), [("50ms", 0.05), ("2s", 2.0), ("1.5m", 90.0), (3, 3.0)]
)
def test_durations(raw: object, seconds: float) -> None:
    assert parse_duration(raw) == seconds
