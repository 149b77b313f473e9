"""lbsync's own classes for one nginx target, called in the bench's process.

``bench rounds`` and ``bench validation`` measure lbsync's stages without a daemon
around them: a real nginx (``env.Nginx``), and the ``Catalog``, ``Renderer``,
``TargetPipeline`` and ``NginxDriver`` the daemon would build for it.
"""

from __future__ import annotations

from pathlib import Path

from bench import env
from lbsync.catalog import Catalog
from lbsync.config import NginxTarget
from lbsync.drivers.nginx.driver import NginxDriver
from lbsync.model import KeyValue
from lbsync.pipeline import TargetPipeline
from lbsync.render import Renderer


def nginx_pipeline(
    root: Path, nginx: env.Nginx, instances: int, layout: str = "spread"
) -> tuple[Catalog, TargetPipeline]:
    """A catalog of ``instances`` (filler in ``layout`` plus the ``probe`` service nginx
    serves) and a pipeline rendering the layout's template into ``nginx``'s config."""
    target = NginxTarget.model_validate(
        {
            "name": "nginx",
            "driver": "nginx",
            "template": [{"src": env.layout_template(layout, root), "dest": nginx.upstreams}],
            "config": nginx.conf,
            "pid_file": nginx.pid_file,
            "binary": env.NGINX,
            "prefix": nginx.dir,
            "error_log": nginx.error_log,
        }
    )
    keys = env.layout_filler(layout, instances - 1)
    keys[env.instance_key("probe", "p1")] = env.instance_value("127.0.0.1", 9)
    catalog = Catalog(env.PREFIX)
    catalog.load((KeyValue(key=k, value=v.encode(), mod_revision=1) for k, v in keys.items()), 1)
    return catalog, TargetPipeline(target, NginxDriver(target), Renderer(), root / "state")
