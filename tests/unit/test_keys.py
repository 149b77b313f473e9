import pytest

from lbsync import keys
from lbsync.errors import ConfigError

PREFIX = "/lbsync"


def relative(key: str) -> str:
    return key.removeprefix(PREFIX)


def test_built_keys_parse_back_to_their_place() -> None:
    assert keys.place(relative(keys.instance_key(PREFIX, "web", "a-1"))) == (
        "web",
        "instances",
        "a-1",
    )
    assert keys.place(relative(keys.health_key(PREFIX, "web", "a-1"))) == ("web", "health", "a-1")
    assert keys.place("/services/web/settings") == ("web", "settings", "")


@pytest.mark.parametrize(
    "key",
    [
        "/services/web",
        "/services/web/instances",
        "/services/web/instances/a/extra",
        "/services/web/probes/a",
        "/services/web/settings/x",
        "/services/Web/instances/a",
        "/services/web/instances/a b",
        "/services/web/instances/a\n",
        "/other/web/instances/a",
        "services/web/instances/a",
    ],
)
def test_off_schema_keys_have_no_place(key: str) -> None:
    assert keys.place(key) is None


@pytest.mark.parametrize(("service", "instance"), [("Web", "a"), ("web", "a/b"), ("web", "")])
def test_unsafe_names_are_refused_when_building(service: str, instance: str) -> None:
    with pytest.raises(ConfigError):
        keys.instance_key(PREFIX, service, instance)
    with pytest.raises(ConfigError):
        keys.health_key(PREFIX, service, instance)
