"""A connection reset between connect and TLS handshake leaves no socket open: CPython's
``SSLSocket._create`` would leave one for the garbage collector (python/cpython#113280),
which turned up as a ResourceWarning in whichever later test happened to collect it."""

from __future__ import annotations

import os
import select
import socket
import ssl
import struct

import pytest

from lbsync.errors import SourceUnavailable
from lbsync.memory import no_cyclic_gc
from lbsync.source.gateway import wrap_tls

E = "https://127.0.0.1:2379"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _reset_connection() -> socket.socket:
    """A client socket whose peer has answered with a RST, the RST already received."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname()[:2], timeout=5)
        accepted, _ = server.accept()
    accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    accepted.close()
    readable, _, _ = select.select([client], [], [], 5)
    assert readable, "the RST did not arrive"
    return client


def test_a_reset_before_the_handshake_leaves_no_socket_open() -> None:
    with no_cyclic_gc():  # a socket left in a reference cycle stays open
        before = _open_fds()
        client = _reset_connection()
        with pytest.raises(SourceUnavailable, match=r"TLS handshake: .*reset") as caught:
            wrap_tls(client, ssl.create_default_context(), "127.0.0.1", E)
        del caught
        assert _open_fds() == before


def test_a_reset_already_read_is_not_taken_for_a_tls_connection() -> None:
    """Once the reset has been read, ``wrap_socket`` returns a socket with no handshake."""
    with no_cyclic_gc():  # a socket left in a reference cycle stays open
        before = _open_fds()
        client = _reset_connection()
        with pytest.raises(ConnectionResetError):
            client.recv(1)
        with pytest.raises(SourceUnavailable, match="closed before it") as caught:
            wrap_tls(client, ssl.create_default_context(), "127.0.0.1", E)
        del caught
        assert _open_fds() == before
