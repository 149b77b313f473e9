"""libcurl's multi interface driven by the running asyncio loop: one awaitable transfer each.

libcurl does the connect, the request and the response parsing in C; this module only
relays its socket and timer wishes to the loop (``add_reader``/``add_writer``/``call_later``)
and hands each finished transfer back to the coroutine that awaits it. One ``CurlLoop`` per
event loop; every transfer is a fresh easy handle, so nothing of one check leaks into the
next.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pycurl

# Error code of a transfer that a write callback stopped on purpose (enough body read).
WRITE_STOPPED = pycurl.E_WRITE_ERROR
TIMED_OUT = pycurl.E_OPERATION_TIMEDOUT


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one transfer ended: libcurl's error (0: none), its message and the socket's errno
    (``OS_ERRNO``: 0 when the OS reported nothing), and the HTTP status (0: none received)."""

    error: int
    message: str
    os_errno: int
    status: int


class CurlLoop:
    """The multi handle of one asyncio loop; ``perform`` runs one transfer to its end."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._multi = pycurl.CurlMulti()
        self._multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self._multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        self._timer: asyncio.TimerHandle | None = None
        self._waiting: dict[pycurl.Curl, asyncio.Future[Outcome]] = {}

    async def perform(self, handle: pycurl.Curl) -> Outcome:
        """Run ``handle`` (set up by the caller) and close it; cancellation (a timeout of
        the caller's) takes it out of the multi handle, which closes its connection."""
        done: asyncio.Future[Outcome] = self._loop.create_future()
        self._waiting[handle] = done
        self._multi.add_handle(handle)
        try:
            return await done
        finally:
            if self._waiting.pop(handle, None) is not None:
                self._multi.remove_handle(handle)
            handle.close()

    def close(self) -> None:
        """Drop every transfer still in flight (their coroutines, if any resume, close
        their handles) and the multi handle."""
        for handle in list(self._waiting):
            self._multi.remove_handle(handle)
        self._waiting.clear()
        if self._timer is not None:
            self._timer.cancel()
        self._multi.close()

    def _on_socket(self, what: int, fd: int, _multi: object, _data: object) -> None:
        """libcurl says which readiness of ``fd`` it waits for (or that it is done with it)."""
        loop = self._loop
        if what & pycurl.POLL_IN and what != pycurl.POLL_REMOVE:
            loop.add_reader(fd, self._act, fd, pycurl.CSELECT_IN)
        else:
            loop.remove_reader(fd)
        if what & pycurl.POLL_OUT and what != pycurl.POLL_REMOVE:
            loop.add_writer(fd, self._act, fd, pycurl.CSELECT_OUT)
        else:
            loop.remove_writer(fd)

    def _on_timer(self, ms: int) -> None:
        """libcurl wants ``socket_action(SOCKET_TIMEOUT)`` in ``ms`` ms (-1: no timer). Never
        called back from here: libcurl forbids re-entering the multi handle in a callback."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if ms >= 0:
            self._timer = self._loop.call_later(ms / 1000, self._act, pycurl.SOCKET_TIMEOUT, 0)

    def _act(self, fd: int, events: int) -> None:
        self._multi.socket_action(fd, events)
        while True:
            queued, succeeded, failed = self._multi.info_read()
            for handle in succeeded:
                self._finish(handle, 0, "")
            for handle, error, message in failed:
                self._finish(handle, error, message)
            if not queued:
                return

    def _finish(self, handle: pycurl.Curl, error: int, message: str) -> None:
        done = self._waiting.pop(handle, None)
        if done is None:
            return
        self._multi.remove_handle(handle)
        if done.done():  # cancelled, its coroutine not yet resumed
            return
        status = int(handle.getinfo(pycurl.RESPONSE_CODE))
        os_errno = int(handle.getinfo(pycurl.OS_ERRNO))
        done.set_result(Outcome(error, message, os_errno, status))
