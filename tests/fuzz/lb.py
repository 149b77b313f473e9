"""Render the stock templates for a snapshot, check them with the real LB, and take their
structure (the skeleton) to compare with a benign catalog of the same shape.

The skeleton is deliberately simple (the suite's own, not lbsync's structural check):
nginx — one entry per statement: block depth, directive name, number of arguments, and
whether it opens a block; HAProxy — one entry per line: whether it starts a section,
its first keyword and its number of words (comments dropped). An injected newline, ``;``,
``{``, ``#`` or quote changes it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from lbsync.config import HaproxyTarget, TemplateSettings
from lbsync.drivers.haproxy.driver import HaproxyDriver
from lbsync.model import Instance, Service, Snapshot
from lbsync.render import Renderer
from tests.harness.haproxy import HAPROXY
from tests.harness.nginx import NGINX

REPO = Path(__file__).resolve().parents[2]
NGINX_TEMPLATES = (
    REPO / "templates" / "nginx" / "upstreams.conf.j2",
    REPO / "templates" / "nginx" / "sites.conf.j2",
)
HAPROXY_TEMPLATE = REPO / "templates" / "haproxy" / "haproxy.cfg.j2"
CHECK_TIMEOUT = 60.0

Skeleton = list[tuple[object, ...]]


# --- nginx ------------------------------------------------------------------------------------


def render_nginx(snapshot: Snapshot) -> dict[str, str]:
    renderer = Renderer()
    return {src.stem: renderer.render(src, snapshot).decode() for src in NGINX_TEMPLATES}


def check_nginx(workdir: Path, files: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on a harness-like nginx.conf that includes the rendered files."""
    tmp = workdir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    includes = ""
    for name, text in files.items():
        (workdir / name).write_text(text)
        includes += f"    include {workdir / name};\n"
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"pid {workdir}/nginx.pid;\n"
        f"error_log {workdir}/error.log;\n"
        "events { worker_connections 64; }\n"
        "http {\n"
        "    access_log off;\n"
        f"    client_body_temp_path {tmp};\n"
        f"    proxy_temp_path {tmp};\n"
        f"    fastcgi_temp_path {tmp};\n"
        f"    uwsgi_temp_path {tmp};\n"
        f"    scgi_temp_path {tmp};\n"
        f"{includes}"
        "}\n"
    )
    argv = [NGINX, "-t", "-q", "-p", str(workdir), "-c", str(conf), "-e", f"{workdir}/error.log"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=CHECK_TIMEOUT, check=False)


# Whitespace, a comment (``#`` at the start of a token), a quoted string, ``; { }``, a word.
_NGINX_TOKEN = re.compile(
    r"""\s+|#[^\n]*|"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|[;{}]|[^\s;{}]+|.""", re.S
)


def nginx_skeleton(text: str) -> Skeleton:
    """Statements as (depth, name, argument count, opens a block); ``}`` as (depth, "}")."""
    out: Skeleton = []
    words: list[str] = []
    depth = 0
    for match in _NGINX_TOKEN.finditer(text):
        token = match.group()
        if token.isspace() or token.startswith("#"):
            continue
        if token in (";", "{"):
            out.append((depth, words[0] if words else "", len(words), token == "{"))
            words = []
            depth += token == "{"
        elif token == "}":
            depth -= 1
            out.append((depth, "}"))
        else:
            words.append(token)
    if words or depth:
        out.append(("unterminated", tuple(words), depth))
    return out


# --- HAProxy ----------------------------------------------------------------------------------


def render_haproxy(snapshot: Snapshot, workdir: Path) -> str:
    target = HaproxyTarget(
        name="fuzz",
        driver="haproxy",
        template=[TemplateSettings(src=HAPROXY_TEMPLATE, dest=workdir / "haproxy.cfg")],
        config=workdir / "absent.cfg",  # nothing to seed slots from: a first render
    )
    context = HaproxyDriver(target).template_context(snapshot)
    return Renderer().render(HAPROXY_TEMPLATE, snapshot, context).decode()


def check_haproxy(workdir: Path, text: str) -> subprocess.CompletedProcess[str]:
    config = workdir / "haproxy.cfg"
    config.write_text(text)
    argv = [HAPROXY, "-c", "-dW", "-f", str(config)]  # as the driver runs it
    return subprocess.run(argv, capture_output=True, text=True, timeout=CHECK_TIMEOUT, check=False)


def haproxy_skeleton(text: str) -> Skeleton:
    out: Skeleton = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            out.append((not line[0].isspace(), words[0], len(words)))
    return out


# --- the benign twin of a snapshot ------------------------------------------------------------


def benign_twin(snapshot: Snapshot) -> Snapshot:
    """The same shape with every free-form string replaced by a plain one.

    Service and instance names keep their sort order; states, weights and the typed
    settings (balance, keepalive, slots: values from an allowlist or integers) are kept,
    ``listen`` becomes a loopback address, hosts a loopback IP of the same family.
    """
    services = {}
    for n, service in enumerate(snapshot.services.values()):
        name = f"s{n:03d}"
        instances = tuple(
            Instance(
                id=f"i{k:03d}",
                host="::1" if ":" in inst.host else "127.0.0.1",
                port=1000 + k,
                weight=inst.weight,
                state=inst.state,
                registered_state=inst.registered_state,
            )
            for k, inst in enumerate(service.instances)
        )
        settings = dict(service.settings)
        if "listen" in settings:
            settings["listen"] = f"127.0.0.1:{20000 + n}"
        services[name] = Service(name=name, instances=instances, settings=settings)
    return Snapshot(revision=snapshot.revision, services=services)
