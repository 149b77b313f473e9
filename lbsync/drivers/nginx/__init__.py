"""nginx: the driver and what only it uses, one module each.

``driver`` (validate, SIGHUP, verify), ``runtime`` (runtime mode: membership pushed to the
Lua balancer), ``control`` (the client of the Lua control endpoint), ``control_token``
(its shared secret), ``lua`` (the Lua syntax check) and ``config`` (nginx's config
tokenizer and its ``listen`` directives, for the listen pre-check).
"""

# Importing the package registers the driver: ``driver_for`` imports ``lbsync.drivers.<kind>``.
from lbsync.drivers.nginx.driver import NginxDriver

__all__ = ["NginxDriver"]
