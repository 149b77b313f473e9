"""The compose demo run for real with podman: base image, image builds, the stack, teardown.

No registry is reachable where the tests run, so images are built from a base made here:
a ``debootstrap --variant=minbase`` of Debian bookworm with Python 3.11 (what the
official python image gives real users), cached as a tarball under
``~/.cache/lbsync/`` and imported into podman's store once. The stack is
``docker-compose.yml`` + ``deploy/compose/test.override.yml`` under podman-compose, every
container in one network namespace that the test makes and that holds nothing but
loopback; the test's own requests enter that namespace with ``ip netns exec``.

podman here needs ``runc`` and explicit ulimits (``tests/harness/containers.conf``, given
to every podman command through ``CONTAINERS_CONF``). The host's CA bundle reaches pip in
the build as a build secret only (the proxy in front of PyPI re-signs TLS).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = Path(__file__).resolve().parent / "containers.conf"
COMPOSE_FILES = (REPO / "docker-compose.yml", REPO / "deploy" / "compose" / "test.override.yml")
PODMAN_COMPOSE = Path(sys.executable).parent / "podman-compose"

# Bump the suffix when the package list changes: the cached tarball is then made anew.
BASE_IMAGE = "localhost/lbsync-base:bookworm-python3-1"
BASE_PACKAGES = ("python3", "python3-venv")
LBSYNC_IMAGE = "localhost/lbsync:dev"
ETCD_IMAGE = "localhost/lbsync-etcd:dev"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

BUILD_TIMEOUT = 600.0
COMMAND_TIMEOUT = 120.0


class PodmanError(AssertionError):
    """A podman, podman-compose or debootstrap command failed; carries its output."""


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def run(
    argv: Sequence[str],
    *,
    timeout: float = COMMAND_TIMEOUT,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command with podman's settings, bounded in time; fail with its output."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env or podman_env(),
            cwd=REPO,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise PodmanError(f"{argv} did not finish in {timeout}s") from exc
    if check and done.returncode != 0:
        raise PodmanError(
            f"{argv} exited {done.returncode}\nstdout: {done.stdout[-3000:]}\n"
            f"stderr: {done.stderr[-3000:]}"
        )
    return done


def missing_tools() -> list[str]:
    tools = ("podman", "runc", "debootstrap", "ip")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if not PODMAN_COMPOSE.exists():
        missing.append(str(PODMAN_COMPOSE))
    return missing


# --- images ----------------------------------------------------------------------------


def apt_mirror() -> str:
    """The Debian mirror apt already uses here (deb822 ``URIs:`` or a ``deb`` line)."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        found = re.search(r"^URIs:\s*(\S+)", sources.read_text(), flags=re.MULTILINE)
        if found:
            return found.group(1)
    classic = Path("/etc/apt/sources.list")
    if classic.exists():
        found = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", classic.read_text(), re.M)
        if found:
            return found.group(1)
    return DEFAULT_MIRROR


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lbsync"


def base_tarball() -> Path:
    return cache_dir() / (BASE_IMAGE.rsplit(":", 1)[1] + ".tar")


def image_exists(image: str) -> bool:
    return run(["podman", "image", "exists", image], check=False).returncode == 0


def ensure_base_image() -> str:
    """The local bookworm + Python base: in podman's store, else from the cache, else made."""
    if image_exists(BASE_IMAGE):
        return BASE_IMAGE
    tarball = base_tarball()
    if not tarball.exists():
        make_base_tarball(tarball)
    run(["podman", "import", str(tarball), BASE_IMAGE], timeout=BUILD_TIMEOUT)
    return BASE_IMAGE


def make_base_tarball(tarball: Path) -> None:
    """debootstrap bookworm (about 45 s) and keep the root file system as a tarball."""
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lbsync-base-") as work:
        root = Path(work) / "rootfs"
        run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=" + ",".join(BASE_PACKAGES),
                "bookworm",
                str(root),
                apt_mirror(),
            ],
            timeout=BUILD_TIMEOUT,
        )
        partial = tarball.with_suffix(".partial")
        run(["tar", "-C", str(root), "-cf", str(partial), "."], timeout=BUILD_TIMEOUT)
        partial.rename(tarball)


def pip_ca_bundle() -> Path:
    """The CA bundle pip uses on this host: ``PIP_CERT``, pip's own config, or Debian's."""
    candidates = [os.environ.get("PIP_CERT", "")]
    listed = run([sys.executable, "-m", "pip", "config", "list"], check=False).stdout
    candidates += re.findall(r"^\S*\.cert='([^']+)'$", listed, flags=re.MULTILINE)
    candidates.append("/etc/ssl/certs/ca-certificates.crt")
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise PodmanError(f"no CA bundle for pip among {candidates}")


def build_images(base: str) -> None:
    """The lbsync image (CA as a build secret, never in a layer) and Debian's etcd."""
    run(
        [
            "podman",
            "build",
            "--network=host",
            f"--secret=id=pip-ca,src={pip_ca_bundle()}",
            f"--build-arg=BASE_IMAGE={base}",
            "--file=deploy/container/Dockerfile",
            "--ignorefile=deploy/container/Dockerfile.dockerignore",
            f"--tag={LBSYNC_IMAGE}",
            ".",
        ],
        timeout=BUILD_TIMEOUT,
    )
    run(
        [
            "podman",
            "build",
            "--network=host",
            f"--build-arg=BASE_IMAGE={base}",
            "--file=deploy/compose/etcd/Dockerfile",
            f"--tag={ETCD_IMAGE}",
            "deploy/compose/etcd",
        ],
        timeout=BUILD_TIMEOUT,
    )


# --- the network namespace -------------------------------------------------------------


@contextlib.contextmanager
def loopback_netns(name: str) -> Iterator[Path]:
    """A network namespace with only ``lo``, up; deleted on exit."""
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield Path("/run/netns") / name
    finally:
        run(["ip", "netns", "delete", name], check=False)


_GET_SCRIPT = """
import sys, urllib.request
for url in sys.argv[1:]:
    try:
        with urllib.request.urlopen(url, timeout=3) as answer:
            print(answer.read().decode().strip().replace("\\n", "\\\\n"))
    except Exception as exc:
        print(f"error: {exc!r}")
"""


def netns_get(netns: str, urls: Sequence[str]) -> list[str]:
    """GET each URL from inside the namespace; a body per URL (newlines escaped), or an error."""
    done = run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", _GET_SCRIPT, *urls],
        timeout=10 + 4 * len(urls),
    )
    return done.stdout.splitlines()


# --- the stack -------------------------------------------------------------------------


def new_project_name() -> str:
    """A compose project name no earlier run used; also the network namespace's name."""
    return f"lbsyncct{secrets.token_hex(4)}"


class ComposeStack:
    """``podman-compose -p <project>`` with the two compose files, in ``netns``."""

    def __init__(self, project: str, netns: Path) -> None:
        self.project = project
        self.netns = netns

    @property
    def env(self) -> dict[str, str]:
        return {
            **podman_env(),
            "LBSYNC_TEST_NETNS": str(self.netns),
            "LBSYNC_TEST_PROJECT": self.project,
        }

    def compose(
        self, *args: str, timeout: float = COMMAND_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        files = [arg for path in COMPOSE_FILES for arg in ("-f", str(path))]
        argv = [str(PODMAN_COMPOSE), "-p", self.project, *files, *args]
        return run(argv, timeout=timeout, env=self.env, check=check)

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def exec(self, service: str, *argv: str) -> subprocess.CompletedProcess[str]:
        """``docker compose exec SERVICE ...`` (no TTY)."""
        return self.compose("exec", "-T", service, *argv)

    def inspect(self, service: str, template: str) -> str:
        done = run(["podman", "inspect", "--format", template, self.container(service)])
        return done.stdout.strip()

    def get(self, urls: Sequence[str]) -> list[str]:
        return netns_get(self.netns.name, urls)

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, volumes and pods of this project that podman still has."""
        label = f"label=io.podman.compose.project={self.project}"
        found = {}
        for kind in ("container", "volume", "pod"):
            listing = ["podman", kind, "ls", "--filter", label, "--format", "json"]
            if kind == "container":
                listing.insert(3, "--all")
            entries = json.loads(run(listing).stdout or "[]")
            found[kind] = [str(entry.get("Names") or entry.get("Name")) for entry in entries]
        return found

    def down(self) -> None:
        """``docker compose down -v``, then remove whatever it left by label."""
        self.compose("down", "--volumes", "--timeout", "10", timeout=180, check=False)
        label = f"label=io.podman.compose.project={self.project}"
        ids = run(["podman", "ps", "--all", "--quiet", "--filter", label], check=False)
        if ids.stdout.split():
            run(["podman", "rm", "--force", "--volumes", *ids.stdout.split()], check=False)
        volumes = run(["podman", "volume", "ls", "--quiet", "--filter", label], check=False)
        if volumes.stdout.split():
            run(["podman", "volume", "rm", "--force", *volumes.stdout.split()], check=False)
        run(["podman", "network", "prune", "--force", "--filter", label], check=False)


def logs(stack: ComposeStack, services: Sequence[str]) -> str:
    """The last lines of each service's output, for a failing test's message."""
    parts = []
    for service in services:
        done = run(["podman", "logs", "--tail", "20", stack.container(service)], check=False)
        parts.append(f"--- {service}\n{done.stdout}{done.stderr}")
    return "\n".join(parts)
