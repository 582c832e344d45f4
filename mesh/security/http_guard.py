"""uvicorn's h11 protocol with a deadline for request headers (slowloris).

uvicorn closes idle keep-alive connections after `timeout_keep_alive`, but a connection that opens
and sends nothing, or sends half a request head and stops, is kept forever: a LAN neighbour could
hold every file descriptor a member has. Here a connection that is not in the middle of a request
gets HEADER_TIMEOUT_S to deliver a complete request head, or it is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("quorum.http")

HEADER_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 512  # uvicorn's limit_concurrency: beyond it, new requests get 503


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


class GuardedH11Protocol(H11Protocol):
    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_request():
            self._disarm()
        elif self._header_timer is None:
            self._arm()  # the start of a next request on a kept-alive connection

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # idle now: uvicorn's keep-alive timeout takes over until data arrives

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        timer, self._header_timer = getattr(self, "_header_timer", None), None
        if timer is not None:
            timer.cancel()

    def _expire(self) -> None:
        self._header_timer = None
        if not self._in_request() and not self.transport.is_closing():
            log.info("closed a connection from %s that sent no complete request in %.0f s",
                     self.client[0] if self.client else "?", self.header_timeout_s)
            self.transport.close()
