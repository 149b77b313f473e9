"""LB drivers; importing this package fills the name table in ``drivers.base``."""

from lbsync.drivers import command, nginx

__all__ = ["command", "nginx"]
