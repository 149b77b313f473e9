"""The differential tests' reference: confd's rendering by Go's own text/template.

``render.go`` (beside this file) re-creates confd's function map and key store from
confd's source; it is built once per test session into a temp dir, offline (standard
library only). Where Go is absent the tests that need it are skipped, with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from lbsync.catalog import Catalog
from lbsync.model import KeyValue
from lbsync.render import Renderer

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "fixtures" / "confd"
GoRender = Callable[[Path, Mapping[str, str], str, Sequence[str]], bytes]


@pytest.fixture(scope="session")
def go_render(tmp_path_factory: pytest.TempPathFactory) -> GoRender:
    """A function rendering a Go template as confd would: (template, keys, prefix, watch)."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go (Debian's golang-go) is not installed: it is the reference renderer")
    work = tmp_path_factory.mktemp("go-reference")
    binary = work / "render"
    env = {
        **os.environ,
        "GOCACHE": str(work / "cache"),
        "GOPATH": str(work / "gopath"),
        "GOTOOLCHAIN": "local",
        "GO111MODULE": "off",
        "GOFLAGS": "",
    }
    subprocess.run(
        [go, "build", "-o", str(binary), str(HERE / "render.go")],
        env=env,
        check=True,
        timeout=300,
        capture_output=True,
    )

    def render(template: Path, keys: Mapping[str, str], prefix: str, watch: Sequence[str]) -> bytes:
        keys_file = work / "keys.json"
        keys_file.write_text(json.dumps(dict(keys)))
        done = subprocess.run(
            [binary, "-keys", keys_file, "-prefix", prefix, "-watch", ",".join(watch), template],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"Go refused {template}: {done.stderr.decode()}")
        return done.stdout

    return render


def render_lbsync(template: Path, keys: Mapping[str, str], lbsync_prefix: str) -> bytes:
    """Render a converted template exactly as the daemon would, over full etcd keys."""
    catalog = Catalog(lbsync_prefix)
    catalog.load([KeyValue(key=k, value=v.encode(), mod_revision=1) for k, v in keys.items()], 1)
    return Renderer().render(template.resolve(), catalog.snapshot())


def fixture_keys() -> dict[str, str]:
    loaded: dict[str, str] = json.loads((FIXTURES / "keys.json").read_text())
    return loaded
