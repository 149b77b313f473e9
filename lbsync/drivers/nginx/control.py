"""The HTTP client for nginx runtime mode's control location (``lbsync/lua/lbsync/runtime.lua``).

One request per connection, each carrying the control token in ``X-Lbsync-Token``; the
answers become frozen models. ``digest`` is the Lua side's fingerprint of a peer list,
computed the same way here, so a poll compares digests instead of whole lists.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lbsync.errors import DriverError

TOKEN_HEADER = "X-Lbsync-Token"


@dataclass(frozen=True)
class ControlState:
    """What the control endpoint says it holds: the current generation and, for it, the
    revision and the digest (of the stored peer list, see ``digest``) of each upstream."""

    generation: str
    services: Mapping[str, int]
    digests: Mapping[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class PushResult:
    applied: bool  # False: nginx already held this revision (idempotent)
    generation: str


class StalePush(DriverError):
    """nginx holds a newer revision of this upstream than the one pushed."""


class ControlClient:
    """One-request-per-connection JSON client for the control location.

    ``Connection: close`` on purpose: a kept-alive connection could stay with a worker of
    the previous generation after a reload.
    """

    def __init__(self, url: str, *, timeout: float, target: str, token: Callable[[], str]) -> None:
        parts = urllib.parse.urlsplit(url)
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path
        self.timeout = timeout
        self.target = target
        self.token = token

    def state(self) -> ControlState:
        status, body = self._request("GET", self.path)
        if status != 200:
            raise self._error("GET", status, body)
        try:
            generation = str(body["generation"])
            held = dict(body["services"])
            services = {str(name): int(info["revision"]) for name, info in held.items()}
            digests = {str(name): _text(info.get("digest")) for name, info in held.items()}
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise DriverError(
                f"control endpoint {self.url}: unexpected answer {body!r:.300}", target=self.target
            ) from exc
        return ControlState(generation, services, digests)

    def held(self, service: str) -> list[dict[str, Any]]:
        """The peer list nginx stores for ``service`` (to show what a tamperer pushed)."""
        status, body = self._request("GET", f"{self.path}services/{service}")
        if status != 200:
            raise self._error(f"GET services/{service}", status, body)
        return _peer_list(body.get("peers"))

    def push(
        self, service: str, revision: int, peers: list[dict[str, Any]], *, force: bool = False
    ) -> PushResult:
        """Store ``peers`` for ``service``; ``force`` stores them whatever revision nginx
        holds (a repair), otherwise an older revision is refused (StalePush)."""
        payload: dict[str, Any] = {"revision": revision, "peers": peers}
        if force:
            payload["force"] = True
        status, body = self._request("POST", f"{self.path}services/{service}", payload)
        if status == 409:
            raise StalePush(
                f"nginx holds revision {body.get('revision')} of {service!r}, newer than "
                f"{revision}",
                target=self.target,
            )
        if status != 200:
            raise self._error(f"POST services/{service}", status, body)
        return PushResult(bool(body.get("applied")), str(body.get("generation")))

    def _request(
        self, method: str, path: str, payload: object | None = None
    ) -> tuple[int, dict[str, Any]]:
        data = None if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        headers = {
            "Connection": "close",
            "Accept": "application/json",
            TOKEN_HEADER: self.token(),
        }
        if data is not None:
            headers["Content-Type"] = "application/json"
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise DriverError(
                f"control endpoint {self.url} unreachable: {getattr(exc, 'strerror', None) or exc}",
                target=self.target,
            ) from exc
        finally:
            conn.close()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"error": raw[:200].decode(errors="replace")}
        return response.status, body if isinstance(body, dict) else {"answer": body}

    def _error(self, what: str, status: int, body: Mapping[str, Any]) -> DriverError:
        reason = body.get("error") or body.get("answer") or ""
        return DriverError(
            f"control endpoint {self.url}: {what} answered {status} {reason}".rstrip(),
            target=self.target,
        )


def digest(peer_list: list[dict[str, Any]]) -> str:
    """SHA-1 (hex) of a peer list as the Lua side computes it over what it stores: one
    line per peer, each field length-prefixed (bytes), so no two lists share an encoding.
    SHA-1 only needs to resist second preimages here: a tamperer must match lbsync's list."""
    lines = []
    for peer in peer_list:
        fields = [str(peer.get("id") or ""), str(peer["host"]), str(peer["port"])]
        fields += [str(peer["weight"]), str(peer["state"])]
        lines.append(b",".join(b"%d:%s" % (len(f.encode()), f.encode()) for f in fields))
    return hashlib.sha1(b"\n".join(lines)).hexdigest()


def _peer_list(raw: object) -> list[dict[str, Any]]:
    """A peer list from the control endpoint; Lua's JSON encoder writes an empty one as
    ``{}``. Anything else that is not a list is kept as found, to show in the event."""
    if raw is None or raw == {}:
        return []
    return raw if isinstance(raw, list) else [{"unexpected": raw}]


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
