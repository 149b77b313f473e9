import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbsync import keys
from lbsync.errors import ConfigError
from lbsync.values import INSTANCE_ID, PROBER_NAME, SERVICE_NAME

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


def reference_place(relative: str) -> tuple[str, str, str] | None:
    """``place`` as it was written before it became one pattern: split, then match parts."""
    parts = relative.split("/")
    if len(parts) < 4 or parts[0] != "" or parts[1] != "services":
        return None
    service = parts[2]
    if not SERVICE_NAME.fullmatch(service):
        return None
    if len(parts) == 4 and parts[3] == "settings":
        return service, "settings", ""
    if len(parts) == 6 and parts[3] == "probes":
        if INSTANCE_ID.fullmatch(parts[4]) and PROBER_NAME.fullmatch(parts[5]):
            return service, "probes", f"{parts[4]}/{parts[5]}"
        return None
    if len(parts) != 5 or not INSTANCE_ID.fullmatch(parts[4]):
        return None
    if parts[3] in ("instances", "health"):
        return service, parts[3], parts[4]
    return None


PARTS = [
    "", "services", "web", "Web", "instances", "health", "probes", "settings", "a", "a-1",
    "a:b@c", "p1", "x y", "a\n", "-a", "é", "a" * 128, "a" * 129, "s" * 63, "s" * 64, ".",
]  # fmt: skip


@settings(max_examples=2000, deadline=None, database=None)
@given(st.lists(st.one_of(st.sampled_from(PARTS), st.text(max_size=5)), min_size=1, max_size=7))
def test_place_agrees_with_the_split_reference(parts: list[str]) -> None:
    for key in ("/".join(parts), "/services/" + "/".join(parts)):
        assert keys.place(key) == reference_place(key)
