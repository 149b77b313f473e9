"""HAProxy admin-socket commands, built only from arguments that pass a strict grammar.

The admin socket takes several commands on one line, separated by ``;``, and a newline
ends a session's line: a host string such as ``"10.0.0.1\\nshutdown sessions server x"`` or
``"10.0.0.1; disable frontend www"`` spliced into ``set server ... addr`` would run a
command lbsync never meant. The catalog validates instances already; this is defence in
depth at the last step before the socket: every argument is matched whole
(``re.fullmatch``) against what HAProxy itself accepts, and anything else raises
``DriverError`` quoting the value, so no command is sent.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from lbsync.errors import DriverError

ServerState = Literal["ready", "drain", "maint"]

MAX_WEIGHT = 256  # HAProxy's limit for a server weight
_STATES = frozenset({"ready", "drain", "maint"})
# HAProxy's proxy and server names: letters, digits, '-', '_', '.', ':' (cfgparse's
# invalid_char); bounded so that a line stays small.
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_IP_CHARS = re.compile(r"[0-9A-Fa-f:.]{2,45}")  # no scope id ("%eth0"), no brackets
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}\Z){_DNS_LABEL}(?:\.{_DNS_LABEL})*\.?")


def set_server_state(backend: str, server: str, state: str, *, target: str) -> str:
    """``set server <backend>/<server> state ready|drain|maint``."""
    if state not in _STATES:
        raise _refused("state", state, target)
    return f"set server {_server_key(backend, server, target)} state {state}"


def set_server_addr(backend: str, server: str, host: str, port: int, *, target: str) -> str:
    """``set server <backend>/<server> addr <ip|dns name> port <port>``."""
    key = _server_key(backend, server, target)
    port_text = _integer("port", port, 1, 65535, target)
    return f"set server {key} addr {_host(host, target)} port {port_text}"


def set_weight(backend: str, server: str, weight: int, *, target: str) -> str:
    """``set weight <backend>/<server> <weight>`` (0 to 256)."""
    key = _server_key(backend, server, target)
    return f"set weight {key} {_integer('weight', weight, 0, MAX_WEIGHT, target)}"


def show_servers_state(backend: str, *, target: str) -> str:
    """``show servers state <backend>``."""
    return f"show servers state {_name('backend', backend, target)}"


def _server_key(backend: str, server: str, target: str) -> str:
    return f"{_name('backend', backend, target)}/{_name('server', server, target)}"


def _name(what: str, value: str, target: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise _refused(what, value, target)
    return value


def _host(host: str, target: str) -> str:
    if isinstance(host, str) and _IP_CHARS.fullmatch(host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return host
    if isinstance(host, str) and _DNS_NAME.fullmatch(host) and not host.replace(".", "").isdigit():
        return host
    raise _refused("host (an IP address or a DNS name)", host, target)


def _integer(what: str, value: int, low: int, high: int, target: str) -> str:
    if type(value) is not int or not low <= value <= high:
        raise _refused(f"{what} (an integer from {low} to {high})", value, target)
    return str(value)


def _refused(what: str, value: object, target: str) -> DriverError:
    return DriverError(
        f"admin-socket command refused: invalid {what} {value!r}; nothing was sent",
        target=target,
    )
