"""Per-service failure isolation: one service's failing change never blocks the others'."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from lbsync import isolation, metrics
from lbsync.config import CommandTarget
from lbsync.errors import (
    LbsyncError,
    RenderError,
    RenderTooLarge,
    StructureViolation,
    ValidationFailed,
)
from lbsync.isolation import Unattributable, find_culprits
from lbsync.model import (
    HealthMark,
    Instance,
    KeyEvent,
    Snapshot,
    SourceEvents,
    State,
    changed_services,
    compose,
)
from lbsync.pipeline import TargetPipeline
from lbsync.render import Renderer
from lbsync.stage.tree import StagedConfig
from lbsync.structure import haproxy_line_shape, nginx_line_shape
from lbsync.testing import FakeCatalog, FakeDriver

P = "/lbsync"

# One line per service; ``div`` = 0 makes that service's line raise ZeroDivisionError,
# ``extra`` lands in the output as it is, ``pad`` grows the render.
TEMPLATE = (
    "{% for s in services.values() %}"
    "{{ s.name }}:{% for i in s.up %} {{ i.address }}{% endfor %}"
    " w={{ 100 // s.settings.get('div', 1) }} {{ s.settings.get('extra', '') }}"
    "{{ 'x' * s.settings.get('pad', 0) }}\n"
    "{% endfor %}"
)

START = {
    "services": {
        "web": {"instances": {"a": "10.0.0.1:80"}},
        "api": {"instances": {"a": "10.0.1.1:80"}},
    }
}


class Etcd:
    """A catalog that keeps unchanged services as the same objects, as the daemon's does."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.fake = FakeCatalog(data)
        self.revision = 1

    def put(self, key: str, value: object) -> Snapshot:
        self.revision += 1
        raw = value.encode() if isinstance(value, str) else json.dumps(value).encode()
        event = KeyEvent(kind="put", key=P + key, value=raw, mod_revision=self.revision)
        self.fake.catalog.apply(SourceEvents(revision=self.revision, events=(event,)))
        return self.snapshot()

    def snapshot(self) -> Snapshot:
        return self.fake.snapshot()


class RefusingDriver(FakeDriver):
    """A checker that refuses any staged file holding ``refuse-me``."""

    refuse = True

    def validate(self, staged: StagedConfig) -> None:
        super().validate(staged)
        if self.refuse and any(b"refuse-me" in p.read_bytes() for p in staged.files.values()):
            raise ValidationFailed("check refused", command=["fake-check"], stderr="refuse-me")


class NginxShapedDriver(FakeDriver):
    def line_shape(self) -> Any:
        return nginx_line_shape


class HaproxyShapedDriver(FakeDriver):
    def line_shape(self) -> Any:
        return haproxy_line_shape


def make_pipeline(
    tmp_path: Path,
    template: str = TEMPLATE,
    driver: FakeDriver | None = None,
    clock: Callable[[], float] = time.monotonic,
    **target: object,
) -> tuple[TargetPipeline, FakeDriver, Path]:
    (tmp_path / "t.j2").write_text(template)
    dest = tmp_path / "out.conf"
    settings = CommandTarget.model_validate(
        {
            "name": target.pop("target_name", "lb"),
            "driver": "command",
            "reload_command": ["true"],
            "template": [{"src": tmp_path / "t.j2", "dest": dest}],
            **target,
        }
    )
    driver = driver or RefusingDriver(settings)
    pipe = TargetPipeline(settings, driver, Renderer(), tmp_path / "state", clock=clock)
    return pipe, driver, dest


def lines(path: Path) -> dict[str, str]:
    return {line.split(":")[0]: line for line in path.read_text().splitlines()}


def test_a_render_error_holds_that_service_back_and_the_rest_applies(tmp_path: Path) -> None:
    pipe, driver, dest = make_pipeline(tmp_path)
    etcd = Etcd(START)
    assert pipe.apply(etcd.snapshot()).action == "reloaded"
    etcd.put("/services/web/settings", {"div": 0})
    poisoned = etcd.put("/services/api/instances/b", "10.0.1.2:80")

    with capture_logs() as events:
        outcome = pipe.apply(poisoned)

    assert outcome.action == "reloaded"
    assert lines(dest)["api"].startswith("api: 10.0.1.1:80 10.0.1.2:80 ")
    assert lines(dest)["web"].startswith("web: 10.0.0.1:80 w=100")  # its last applied state
    held = outcome.held["web"]
    assert isinstance(held.error, RenderError)
    assert "ZeroDivisionError" in str(held.error)
    assert held.keys == ("/services/web/settings",)
    assert list(outcome.held) == ["web"]
    [event] = [e for e in events if e["event"] == "service.held"]
    assert event["service"] == "web"
    assert event["keys"] == ["/services/web/settings"]
    assert event["error"] is held.error  # capture_logs skips processors: the exception itself
    assert driver.reloads == 2


def test_a_held_service_does_not_delay_a_later_change_and_is_not_retried(
    tmp_path: Path,
) -> None:
    pipe, driver, dest = make_pipeline(tmp_path)
    etcd = Etcd(START)
    pipe.apply(etcd.snapshot())
    pipe.apply(etcd.put("/services/web/settings", {"div": 0}))
    assert set(pipe.held) == {"web"}
    validations = len(driver.validated)

    outcome = pipe.apply(etcd.put("/services/api/health/a", "down"))

    assert outcome.action == "reloaded"
    assert "10.0.1.1:80" not in lines(dest)["api"]
    assert "isolate" not in outcome.durations  # web's unchanged data was not tried again
    assert len(driver.validated) == validations + 1
    assert set(outcome.held) == {"web"}


def test_an_unchanged_held_service_is_retried_after_a_growing_delay(tmp_path: Path) -> None:
    """What the checker refused may have been the environment: tried again after 60 s,
    then 120 s, at the first round after that, never on every round."""
    now = [1000.0]
    pipe, driver, dest = make_pipeline(tmp_path, clock=lambda: now[0])
    etcd = Etcd(START)
    pipe.apply(etcd.snapshot())
    pipe.apply(etcd.put("/services/web/settings", {"extra": "refuse-me"}))
    assert (pipe.held["web"].attempt, pipe.held["web"].retry_at) == (1, 1060.0)

    now[0] = 1059.0
    assert (
        "isolate" not in pipe.apply(etcd.put("/services/api/instances/b", "10.0.1.2:80")).durations
    )
    now[0] = 1060.0
    retried = pipe.apply(etcd.put("/services/api/instances/c", "10.0.1.3:80"))
    assert "isolate" in retried.durations
    assert (retried.held["web"].attempt, retried.held["web"].retry_at) == (2, 1180.0)
    assert "10.0.1.3:80" in lines(dest)["api"]

    driver.refuse = False  # the environment was fixed
    now[0] = 1180.0
    fixed = pipe.apply(etcd.put("/services/api/instances/d", "10.0.1.4:80"))
    assert fixed.held == {}
    assert "refuse-me" in lines(dest)["web"]


def test_a_held_service_recovers_when_its_data_is_fixed(tmp_path: Path) -> None:
    pipe, _driver, dest = make_pipeline(tmp_path)
    etcd = Etcd(START)
    pipe.apply(etcd.snapshot())
    pipe.apply(etcd.put("/services/web/settings", {"div": 0}))
    assert pipe.apply(etcd.put("/services/web/settings", {"div": 0, "extra": "x"})).held

    with capture_logs() as events:
        outcome = pipe.apply(etcd.put("/services/web/settings", {"div": 4}))

    assert outcome.action == "reloaded"
    assert outcome.held == {}
    assert "w=25" in lines(dest)["web"]
    assert [e["service"] for e in events if e["event"] == "service.released"] == ["web"]


def test_a_checker_refusal_caused_by_one_service_holds_only_that_one(tmp_path: Path) -> None:
    pipe, driver, dest = make_pipeline(tmp_path)
    etcd = Etcd(START)
    pipe.apply(etcd.snapshot())
    etcd.put("/services/web/settings", {"extra": "refuse-me"})
    outcome = pipe.apply(etcd.put("/services/api/instances/b", "10.0.1.2:80"))

    assert outcome.action == "reloaded"
    assert isinstance(outcome.held["web"].error, ValidationFailed)
    assert "refuse-me" not in dest.read_text()
    assert "10.0.1.2:80" in lines(dest)["api"]
    assert driver.calls[-2:] == ["reload", "verify"]


def test_several_bad_services_among_many_changes_in_one_round(tmp_path: Path) -> None:
    series = metrics.enable()  # recording from the start
    pipe, _driver, dest = make_pipeline(tmp_path, target_name="many")
    services = {f"s{n}": {"instances": {"a": f"10.0.2.{n}:80"}} for n in range(8)}
    etcd = Etcd({"services": services})
    pipe.apply(etcd.snapshot())
    events = [
        KeyEvent(
            kind="put", key=f"{P}/services/s{n}/instances/b", value=b"10.0.3.1:80", mod_revision=2
        )
        for n in range(8)
    ]
    for n, bad in ((1, {"div": 0}), (4, {"extra": "refuse-me"}), (6, {"div": 0})):
        value = json.dumps(bad).encode()
        events.append(
            KeyEvent(kind="put", key=f"{P}/services/s{n}/settings", value=value, mod_revision=2)
        )
    etcd.fake.catalog.apply(SourceEvents(revision=2, events=tuple(events)))

    outcome = pipe.apply(etcd.snapshot())

    assert outcome.action == "reloaded"
    assert sorted(outcome.held) == ["s1", "s4", "s6"]
    assert isinstance(outcome.held["s4"].error, ValidationFailed)
    assert isinstance(outcome.held["s6"].error, RenderError)
    rendered = lines(dest)
    for n in range(8):
        applied = "10.0.3.1:80" in rendered[f"s{n}"]
        assert applied is (n not in (1, 4, 6)), rendered[f"s{n}"]
    assert series.registry.get_sample_value("lbsync_services_held", {"target": "many"}) is None
    metrics.record_outcome(outcome)
    assert series.registry.get_sample_value("lbsync_services_held", {"target": "many"}) == 3
    holds = {"target": "many", "error": "RenderError"}
    assert series.registry.get_sample_value("lbsync_service_holds_total", holds) == 2


def test_a_new_service_that_fails_stays_absent(tmp_path: Path) -> None:
    pipe, _driver, dest = make_pipeline(tmp_path)
    etcd = Etcd(START)
    pipe.apply(etcd.snapshot())
    etcd.put("/services/new/settings", {"div": 0})
    outcome = pipe.apply(etcd.put("/services/new/instances/a", "10.0.2.1:80"))

    assert outcome.action == "unchanged"
    assert set(outcome.held) == {"new"}
    assert "new" not in lines(dest)


def test_a_template_bug_fails_the_round_as_a_whole(tmp_path: Path) -> None:
    template = "{% for s in services.values() %}{{ s.name }} {{ s.nope }}\n{% endfor %}"
    pipe, driver, dest = make_pipeline(tmp_path, template)
    etcd = Etcd(START)

    outcome = pipe.apply(etcd.snapshot())

    assert outcome.action == "failed"
    assert isinstance(outcome.error, RenderError)
    assert outcome.held == {}
    assert not dest.exists()
    assert driver.calls == []


def test_before_a_first_applied_round_nothing_is_held_or_left_out(tmp_path: Path) -> None:
    """No last applied version to hold ``web`` at: leaving it out could drop it from an LB
    that serves it from the files on disk, so the round fails whole."""
    pipe, driver, dest = make_pipeline(tmp_path)
    etcd = Etcd(START)

    outcome = pipe.apply(etcd.put("/services/web/settings", {"div": 0}))

    assert outcome.action == "failed"
    assert "ZeroDivisionError" in str(outcome.error)
    assert outcome.held == {}
    assert not dest.exists()
    assert driver.calls == []


def test_a_checker_that_refuses_everything_holds_nobody(tmp_path: Path) -> None:
    pipe, driver, dest = make_pipeline(tmp_path)
    etcd = Etcd(START)
    pipe.apply(etcd.snapshot())
    before = dest.read_text()
    driver.fail_validate = True

    outcome = pipe.apply(etcd.put("/services/api/instances/b", "10.0.1.2:80"))

    assert outcome.action == "failed"
    assert isinstance(outcome.error, ValidationFailed)
    assert outcome.held == {}
    assert dest.read_text() == before


def test_a_render_past_the_size_cap_holds_the_service_that_grew_it(tmp_path: Path) -> None:
    pipe, _driver, dest = make_pipeline(tmp_path, max_render_bytes=2048)
    etcd = Etcd(START)
    pipe.apply(etcd.snapshot())
    etcd.put("/services/web/settings", {"pad": 4096})
    outcome = pipe.apply(etcd.put("/services/api/instances/b", "10.0.1.2:80"))

    error = outcome.held["web"].error
    assert isinstance(error, RenderTooLarge)
    assert error.cap == 2048
    assert "10.0.1.2:80" in lines(dest)["api"]
    assert "xxxx" not in dest.read_text()


NGINX = (
    "{% for s in services.values() %}upstream {{ s.name }} {\n"
    "{% for i in s.instances %}    server {{ i.address }};"
    "  # {{ i.health.reason if i.health else '' }}\n"
    "{% endfor %}}\n{% endfor %}"
)


def with_instance(snapshot: Snapshot, service: str, instance: Instance) -> Snapshot:
    """``snapshot`` with one instance added, built directly: no validation on the way."""
    old = snapshot.services[service]
    services = dict(snapshot.services)
    services[service] = old.model_copy(update={"instances": (*old.instances, instance)})
    return Snapshot.model_construct(
        revision=snapshot.revision + 1, services=services, keys=snapshot.keys
    )


def test_an_injected_nginx_directive_is_refused_before_the_checker(tmp_path: Path) -> None:
    pipe, driver, dest = make_pipeline(tmp_path, NGINX, NginxShapedDriver())
    etcd = Etcd(START)
    pipe.apply(etcd.snapshot())
    hostile = Instance.model_construct(
        id="evil", host="10.0.0.9;\n    include /etc/passwd", port=80
    )
    snapshot = with_instance(etcd.put("/services/api/instances/b", "10.0.1.2:80"), "web", hostile)

    outcome = pipe.apply(snapshot)

    error = outcome.held["web"].error
    assert isinstance(error, StructureViolation)
    assert error.directive == "include /etc/passwd:80;  #"
    assert all(b"passwd" not in data for v in driver.validated for data in v.values())
    assert "include" not in dest.read_text()
    assert "server 10.0.1.2:80;" in dest.read_text()  # the other change applied
    assert outcome.action == "reloaded"


def test_structural_characters_inside_a_comment_are_not_a_violation(tmp_path: Path) -> None:
    pipe, _driver, dest = make_pipeline(tmp_path, NGINX, NginxShapedDriver())
    etcd = Etcd(START)
    pipe.apply(etcd.snapshot())
    mark = HealthMark(status=State.DOWN, reason="HTTP 503; { see #4")
    marked = Instance.model_construct(id="b", host="10.0.0.2", port=80, health=mark)

    outcome = pipe.apply(with_instance(etcd.snapshot(), "web", marked))

    assert outcome.action == "reloaded", outcome.error
    assert outcome.held == {}
    assert "server 10.0.0.2:80;  # HTTP 503; { see #4\n" in dest.read_text()


HAPROXY = (
    "global\n    maxconn 100\n"
    "{% for s in services.values() %}backend {{ s.name }}\n"
    "{% for i in s.instances %}    server {{ i.id }} {{ i.address }} check\n{% endfor %}"
    "{% endfor %}"
)


def test_an_injected_haproxy_program_section_is_refused(tmp_path: Path) -> None:
    pipe, _driver, dest = make_pipeline(tmp_path, HAPROXY, HaproxyShapedDriver())
    etcd = Etcd(START)
    pipe.apply(etcd.snapshot())
    hostile = Instance.model_construct(
        id="x 10.0.0.9:80\nprogram pwn\n    command /bin/sh -c id\n#", host="10.0.0.9", port=80
    )
    snapshot = with_instance(etcd.put("/services/api/instances/b", "10.0.1.2:80"), "web", hostile)

    outcome = pipe.apply(snapshot)

    error = outcome.held["web"].error
    assert isinstance(error, StructureViolation)
    assert "'program'" in str(error)
    assert "program" not in dest.read_text()
    assert "server b 10.0.1.2:80 check" in dest.read_text()


def test_a_raw_key_that_breaks_out_is_a_violation_of_the_whole_render(tmp_path: Path) -> None:
    template = "set $greeting {{ getv('/greeting') }};\n"
    pipe, _driver, dest = make_pipeline(tmp_path, template, NginxShapedDriver())
    etcd = Etcd({"keys": {"/greeting": "hello"}})
    assert pipe.apply(etcd.snapshot()).action == "reloaded"

    outcome = pipe.apply(etcd.put("/greeting", "hi; load_module /tmp/evil.so"))

    assert outcome.action == "failed"  # a raw key belongs to no service: nobody to hold
    assert isinstance(outcome.error, StructureViolation)
    assert "load_module" in str(outcome.error)
    assert dest.read_text() == "set $greeting hello;\n"


# --- find_culprits, alone ------------------------------------------------------------


def failing_with(*culprits: str) -> isolation.Trial:
    def trial(names: Any) -> LbsyncError | None:
        bad = sorted(set(names) & set(culprits))
        return LbsyncError(f"{bad} fail") if bad else None

    return trial


def test_bisection_finds_every_culprit() -> None:
    suspects = [f"s{n:02}" for n in range(40)]
    found = find_culprits(suspects, LbsyncError("all"), failing_with("s03", "s31"))
    assert sorted(found) == ["s03", "s31"]
    assert str(found["s03"]) == "['s03'] fail"


def test_services_that_fail_only_together_are_unattributable() -> None:
    def together(names: Any) -> LbsyncError | None:
        return LbsyncError("both") if {"a", "b"} <= set(names) else None

    with pytest.raises(Unattributable, match="together"):
        find_culprits(["a", "b"], LbsyncError("both"), together)


def test_bisection_gives_up_past_its_budget() -> None:
    suspects = [f"s{n}" for n in range(8)]
    with pytest.raises(Unattributable, match="within 3 trials"):
        find_culprits(suspects, LbsyncError("all"), failing_with(*suspects), budget=3)


def test_compose_keeps_unchanged_services_identical() -> None:
    etcd = Etcd(START)
    base = etcd.snapshot()
    etcd.put("/services/web/settings", {"div": 0})
    candidate = etcd.put("/services/api/instances/b", "10.0.1.2:80")

    composed = compose(base, candidate, {"web"})

    assert composed.services["web"] is base.services["web"]
    assert composed.services["api"] is candidate.services["api"]
    assert "/services/web/settings" not in composed.keys
    assert composed.keys["/services/api/instances/b"] == "10.0.1.2:80"
    assert changed_services(base, candidate) == ["api", "web"]


def test_changed_services_names_added_removed_and_changed_ones_sorted() -> None:
    etcd = Etcd(START)
    base = etcd.snapshot()
    assert changed_services(base, base) == []
    candidate = etcd.put("/services/zeta/instances/a", "10.0.9.1:80")
    assert changed_services(base, candidate) == ["zeta"]
    assert changed_services(candidate, base) == ["zeta"]
    later = etcd.put("/services/api/instances/b", "10.0.1.2:80")
    assert changed_services(candidate, later) == ["api"]
    assert changed_services(base, later) == ["api", "zeta"]
