"""The sidecar for real: build the image, run docker-compose.yml with podman, take the tour.

The stack is the compose demo as a user runs it, with the test override
(deploy/compose/test.override.yml: etcd built from Debian's package, every container in a
loopback-only network namespace made here). The tour is the one in docker-compose.yml's
header: traffic through nginx reaches the registered backends in turn, ``lbsync mark``
inside the lbsync container takes one out, stopping a registrar removes its backend,
``lbsync status`` shows it all, ``/metrics`` answers; nginx's master is the same process
throughout (lbsync reloads it by signal through the shared PID namespace); ``down``
leaves nothing behind.

Costs (2 cores, shared): 2-3 min the first time (debootstrap of the base, both image
builds); 20-45 s once the base is cached (docs/operations.md has the measurements).
Needs root, podman, runc, debootstrap and podman-compose (scripts/setup.sh installs
them); without them the test is skipped, except in CI, where it fails.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.harness import podman
from tests.harness.net import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.container]

FRONT = "http://127.0.0.1:8080/"
METRICS = "http://127.0.0.1:9274/metrics"
BACKENDS = {"web-1", "web-2", "web-3"}
SERVICES = ("etcd", "nginx", "lbsync", "web-1-register")
# A stack on a busy 2-core machine: generous bounds, met in seconds when healthy.
SETTLE = 90.0


def require_podman() -> None:
    problems = [f"{tool} not found" for tool in podman.missing_tools()]
    if os.geteuid() != 0:
        problems.append("not root (rootful podman and `ip netns add` are needed)")
    if not problems:
        return
    reason = "container test cannot run: " + "; ".join(problems) + " (run scripts/setup.sh)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def images() -> str:
    require_podman()
    base = podman.ensure_base_image()
    podman.build_images(base)
    return podman.LBSYNC_IMAGE


@pytest.fixture(scope="module")
def stack(images: str) -> Iterator[podman.ComposeStack]:
    project = podman.new_project_name()
    with podman.loopback_netns(project) as netns:
        stack = podman.ComposeStack(project, netns)
        try:
            stack.compose("up", "-d", "--no-build", timeout=300)
            yield stack
        finally:
            stack.down()


def front_door(stack: podman.ComposeStack, requests: int = 6) -> list[str]:
    return stack.get([FRONT] * requests)


def serving(stack: podman.ComposeStack, expected: set[str]) -> list[str] | None:
    """The front door's answers once exactly ``expected`` take turns (round robin)."""
    answers = front_door(stack, 2 * len(expected))
    turn = answers[: len(expected)]
    if set(answers) == expected and set(turn) == expected:
        return answers
    return None


def wait_serving(stack: podman.ComposeStack, expected: set[str], what: str) -> list[str]:
    try:
        return wait_for(lambda: serving(stack, expected), timeout=SETTLE, interval=0.5, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{podman.logs(stack, SERVICES)}") from exc


def metric(text: str, name: str, labels: str) -> float:
    found = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    assert found, f"{name}{{{labels}}} not in /metrics"
    return float(found.group(1))


def scrape(stack: podman.ComposeStack) -> str:
    (body,) = stack.get([METRICS])
    assert not body.startswith("error:"), body
    return body.replace("\\n", "\n")


def status_rows(stack: podman.ComposeStack) -> tuple[dict[str, str], str]:
    """``lbsync status`` in the lbsync container: instance id → its row, and the whole text."""
    text = stack.exec("lbsync", "lbsync", "status").stdout
    rows = {line.split()[1]: line for line in text.splitlines() if line.startswith("web ")}
    return rows, text


def nginx_master(stack: podman.ComposeStack) -> psutil.Process:
    return psutil.Process(int(stack.inspect("nginx", "{{.State.Pid}}")))


def pid_namespace(stack: podman.ComposeStack, service: str) -> str:
    pid = stack.inspect(service, "{{.State.Pid}}")
    return os.readlink(f"/proc/{pid}/ns/pid")


def test_image_runs_lbsync_as_non_root_and_keeps_nothing_of_the_build(images: str) -> None:
    script = (
        "id -un; id -u; lbsync --version; nginx -v 2>&1; "
        "ls -A /run/secrets; test -e /etc/pip.conf && echo pip.conf present; true"
    )
    done = podman.run(
        ["podman", "run", "--rm", "--network=none", "--entrypoint=sh", images, "-c", script]
    )
    lines = done.stdout.splitlines()
    assert lines[:2] == ["lbsync", "10001"], done.stdout
    assert lines[2].startswith("lbsync "), done.stdout
    assert lines[3].startswith("nginx version: nginx/"), done.stdout
    assert len(lines) == 4, f"build-time files left in the image: {lines[4:]}"


def proc_status(stack: podman.ComposeStack, service: str) -> dict[str, str]:
    """/proc/<pid>/status of the service's main process, seen from the host."""
    pid = stack.inspect(service, "{{.State.Pid}}")
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


@pytest.mark.parametrize("service", ["nginx", "lbsync", "web-1", "web-1-register"])
def test_containers_run_unprivileged_on_a_read_only_root(
    stack: podman.ComposeStack, service: str
) -> None:
    status = proc_status(stack, service)
    assert status["Uid"].split()[:2] == ["10001", "10001"], status["Uid"]
    assert int(status["CapEff"], 16) == 0, status["CapEff"]
    assert int(status["CapBnd"], 16) == 0, status["CapBnd"]
    assert status["NoNewPrivs"].strip() == "1"
    assert stack.inspect(service, "{{.HostConfig.ReadonlyRootfs}}") == "true"
    probe = stack.compose(
        "exec", "-T", service, "sh", "-c", "touch /var/lib/lbsync-probe", check=False
    )
    assert probe.returncode != 0, "the root file system is writable"
    assert "Read-only file system" in probe.stdout + probe.stderr


def test_the_compose_tour(stack: podman.ComposeStack) -> None:
    # curl -s localhost:8080/   → web-1, web-2, web-3 in turn
    wait_serving(stack, BACKENDS, "all three backends in turn")
    master = nginx_master(stack)
    first_workers = {child.pid for child in master.children()}
    reloads_before = metric(scrape(stack), "lbsync_reloads_total", 'result="ok",target="nginx"')
    assert pid_namespace(stack, "lbsync") == pid_namespace(stack, "nginx")

    # docker compose exec lbsync lbsync mark web web-2 down --reason "demo"
    marked = stack.exec("lbsync", "lbsync", "mark", "web", "web-2", "down", "--reason", "demo")
    assert "marked down" in marked.stdout, marked.stdout
    wait_serving(stack, {"web-1", "web-3"}, "web-2 out of rotation")

    # docker compose stop web-3-register   → deregisters at once
    stack.compose("stop", "web-3-register")
    wait_serving(stack, {"web-1"}, "web-3 gone with its registrar")

    # docker compose exec lbsync lbsync status
    rows, text = status_rows(stack)
    assert set(rows) == {"web-1", "web-2"}, text
    assert rows["web-1"].split()[-1] == "up", text
    assert "down (demo)" in rows["web-2"], text
    assert rows["web-2"].split()[-1] == "down", text
    assert "targets.nginx.action: reloaded" in text, text

    # curl -s localhost:9274/metrics | grep ^lbsync_
    metrics = scrape(stack)
    assert metric(metrics, "lbsync_instances", 'service="web",state="up"') == 1
    assert metric(metrics, "lbsync_instances", 'service="web",state="down"') == 1
    reloads = metric(metrics, "lbsync_reloads_total", 'result="ok",target="nginx"')
    assert reloads >= reloads_before + 2
    assert metric(metrics, "lbsync_reloads_total", 'result="failed",target="nginx"') == 0

    # Reloaded by signal, never restarted: the same master, new workers.
    assert nginx_master(stack).pid == master.pid
    assert master.is_running()
    assert {child.pid for child in master.children()}.isdisjoint(first_workers)
    assert stack.inspect("nginx", "{{.RestartCount}}") == "0"

    # docker compose down   → nothing of the project left
    stack.down()
    leftovers = stack.leftovers()
    assert leftovers == {"container": [], "volume": [], "pod": []}, leftovers
    assert not master.is_running()
