"""uvicorn's h11 protocol with one deadline for each whole request and caps on connections.

uvicorn closes idle keep-alive connections after `timeout_keep_alive`, but a connection that opens
and sends nothing, sends half a request head, or sends a head and then trickles its body a byte a
second, is kept forever: a LAN neighbour could hold every connection slot a member has. Here:

- **One deadline per request, head and body.** From its first byte (or the connection's opening) a
  request has `request_timeout_s`, plus one second for every `min_bytes_per_s` bytes it has delivered,
  to arrive completely; otherwise the connection is closed (with a 408 when some of it came and no
  answer has started). A body arriving at a useful rate is never cut; a trickle is, after about
  `request_timeout_s`. While the server itself stops reading (the app is not consuming the body),
  the clock restarts: that wait is not the client's.
- **Connections per client address** (`max_per_address`): beyond it a new connection is answered 429
  and closed. `exempt(node_id)` (the peer port: a live member's verified certificate) lifts it, so
  members relaying from one machine, loopback included, are never starved. Loopback clients are not
  capped by address: every local program shares 127.0.0.1 (one runaway script would lock meshctl and
  the local services out), and a local user can exhaust the machine anyway; the deadline still
  bounds what each of their connections holds. Strangers on loopback still count in the join pool.
- **A pool of its own for strangers on the peer port** (`stranger_pool`: connections without a live
  member's certificate, which can only join): beyond it a new one is answered 503 and closed, so a
  join flood cannot take the slots relayed requests need.
- uvicorn's `limit_concurrency` (MAX_CONNECTIONS) stays the overall bound: beyond it requests get 503.

A TLS connection reaches this protocol once its handshake is done; the handshake itself must finish
within `request_timeout_s` (QuietServer), or the connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import ssl
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("quorum.http")

HEADER_TIMEOUT_S = 10.0  # the default whole-request deadline (gateway.request_timeout_s)
MAX_CONNECTIONS = 512  # uvicorn's limit_concurrency: beyond it, new requests get 503


@dataclass(frozen=True)
class ConnectionLimits:
    """What one HTTP server allows (mesh.toml [gateway]; the defaults are mesh.toml's)."""
    request_timeout_s: float = HEADER_TIMEOUT_S  # a request's head and body, before the rate allowance
    min_bytes_per_s: int = 16384  # each this many bytes received buys one more second
    max_per_address: int = 64  # concurrent connections from one client IP address (0: no cap)
    stranger_pool: int = 16  # peer port: connections without a live member's certificate (0: no cap)


def limits_from(gateway: Any) -> ConnectionLimits:
    """The limits mesh.toml's [gateway] section sets (mesh/core/config.py GatewayConfig)."""
    return ConnectionLimits(request_timeout_s=float(gateway.request_timeout_s),
                            min_bytes_per_s=gateway.request_min_bytes_per_s,
                            max_per_address=gateway.max_connections_per_address,
                            stranger_pool=gateway.peer_join_connections)


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling (the daemon decides when to stop), whose TLS handshakes must
    finish within `handshake_s` (asyncio's own bound is 60 s; a connection counts against the caps only
    once it is done)."""

    def __init__(self, config: uvicorn.Config, handshake_s: float = HEADER_TIMEOUT_S) -> None:
        super().__init__(config)
        self.handshake_s = handshake_s

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield

    async def startup(self, sockets: list | None = None) -> None:
        if self.config.ssl is None:
            return await super().startup(sockets)
        # uvicorn passes no ssl_handshake_timeout to create_server: give it one for the listeners it makes now.
        # Servers starting at once (the gateway and the peer port) share the patch: the last one out removes it.
        loop = asyncio.get_running_loop()
        starting = getattr(loop, "_quorum_tls_startups", 0)
        if not starting:
            loop.create_server = functools.partial(type(loop).create_server, loop,
                                                   ssl_handshake_timeout=self.handshake_s)
        loop._quorum_tls_startups = starting + 1
        try:
            await super().startup(sockets)
        finally:
            loop._quorum_tls_startups -= 1
            if not loop._quorum_tls_startups:
                del loop.create_server  # the loop's own method again


_RECEIVING = (h11.IDLE, h11.SEND_BODY)  # the client's side of h11: a request still (or about to be) arriving


class GuardedH11Protocol(H11Protocol):
    """Use `guarded(limits)` to get a class with its own limits and connection counts per server."""
    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    _open: ClassVar[Counter] = Counter()  # connections per (pool, address) of this server

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer: asyncio.TimerHandle | None = None
        self._started = 0.0
        self._received = 0
        self._counted: tuple[str, str] | None = None
        self._shut = not self._admit()
        if not self._shut:
            self._start_clock(0)

    # -- the whole-request deadline ----------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._shut:
            return  # refused at connection_made; the transport is closing
        if self._timer is None:
            self._start_clock(0)  # the first bytes of the next request on a kept-alive connection
        self._received += len(data)
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._uncount()
        super().connection_lost(exc)

    def _receiving(self) -> bool:
        """Whether a request is (partly) in: a body still due, or a head begun (bytes buffered)."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            return True
        return state is h11.IDLE and bool(self.conn.trailing_data[0]) and self.conn.our_state is h11.IDLE

    def _follow(self) -> None:
        """After h11 has taken bytes or a response ended: keep the clock while a request is arriving
        (even one already answered, as a refusal sent before its body), stop it otherwise (idle
        between requests: uvicorn's keep-alive timeout is in charge then)."""
        if self.transport.is_closing() or not self._receiving():
            self._disarm()

    def _deadline(self) -> float:
        return self._started + self.limits.request_timeout_s + self._received / max(1, self.limits.min_bytes_per_s)

    def _start_clock(self, received: int) -> None:
        self._started, self._received = self.loop.time(), received
        self._arm_at(self._deadline())

    def _arm_at(self, when: float) -> None:
        self._disarm()
        self._timer = self.loop.call_at(when, self._expire)

    def _disarm(self) -> None:
        timer, self._timer = getattr(self, "_timer", None), None
        if timer is not None:
            timer.cancel()

    def _expire(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:  # we stopped reading (the app holds the body back): not the client's time
            self._start_clock(0)
            return
        if self.loop.time() < self._deadline():  # bytes came since it was armed: a later deadline
            self._arm_at(self._deadline())
            return
        if not self._receiving() and not (self.conn.their_state is h11.IDLE and self.cycle is None):
            return  # the request is in; what follows is the answer's time, not the client's
        who = self.client[0] if self.client else "?"
        log.info("closed a connection from %s: its request did not arrive within %.0f s (%d bytes came)",
                 who, self._deadline() - self._started, self._received)
        # The cycle is this request's while its body is due; before that it is the last request's.
        started = self.conn.their_state is h11.SEND_BODY and self.cycle is not None and self.cycle.response_started
        if self.cycle is not None:  # the app (if running) sees a disconnect; nothing more is sent for it
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if self._received and not started:
            self._write_refusal(408, "Request Timeout", "The request did not arrive in time (too slow).",
                                "request_timeout")
        self.transport.close()

    # -- connection caps ---------------------------------------------------------------------

    def _limit_key(self) -> tuple[str, str] | None:
        """(pool, address) this connection counts in, or None when it is exempt."""
        return ("address", self.client[0]) if self.client else None

    def _admit(self) -> bool:
        key = self._limit_key()
        if key is None:
            return True
        pool, address = key
        if pool == "stranger" and self.limits.stranger_pool and \
                sum(n for (p, _), n in self._open.items() if p == "stranger") >= self.limits.stranger_pool:
            log.warning("refused a peer-port connection from %s: %d connections without a member certificate "
                        "are open (gateway.peer_join_connections)", address, self.limits.stranger_pool)
            self._refuse(503, "Service Unavailable", "Too many joins in progress; try again shortly.",
                         "join_pool_full")
            return False
        if self.limits.max_per_address and not _loopback(address) and \
                self._open[key] + self._open_elsewhere(key) >= self.limits.max_per_address:
            log.warning("refused a connection from %s: %d open from that address "
                        "(gateway.max_connections_per_address)", address, self.limits.max_per_address)
            self._refuse(429, "Too Many Requests", "Too many connections from your address.",
                         "too_many_connections")
            return False
        self._open[key] += 1
        self._counted = key
        return True

    def _open_elsewhere(self, key: tuple[str, str]) -> int:
        """Connections from the same address in the other pool (strangers count against the address cap)."""
        other = ("address" if key[0] == "stranger" else "stranger", key[1])
        return self._open.get(other, 0)

    def _uncount(self) -> None:
        key, self._counted = getattr(self, "_counted", None), None
        if key is not None:
            self._open[key] -= 1
            if self._open[key] <= 0:
                del self._open[key]

    def _refuse(self, status: int, reason: str, message: str, code: str) -> None:
        self._write_refusal(status, reason, message, code)
        self.transport.close()

    def _write_refusal(self, status: int, reason: str, message: str, code: str) -> None:
        """A whole answer written past h11 (the connection closes right after): OpenAI's error body."""
        kind = {429: "rate_limit_error", 503: "server_error"}.get(status, "invalid_request_error")
        body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"retry-after: 1\r\nconnection: close\r\n\r\n%s"
                             % (status, reason.encode(), len(body), body))


def guarded(limits: ConnectionLimits, base: type[GuardedH11Protocol] = GuardedH11Protocol,
            **attributes: Any) -> type[GuardedH11Protocol]:
    """A protocol class for one server: `limits`, its own connection counts, and `attributes`."""
    return type(f"Guarded{base.__name__}", (base,), {"limits": limits, "_open": Counter(), **attributes})


def guarded_server(app: Any, protocol: type[GuardedH11Protocol], ssl_context: ssl.SSLContext | None = None
                   ) -> QuietServer:
    """A uvicorn server speaking `protocol` (serve it with `sockets=[bound socket]`), over TLS when
    `ssl_context` is given (then nothing else: plain HTTP on that port fails its handshake)."""
    config = uvicorn.Config(app, http=protocol, log_config=None, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=3, timeout_keep_alive=30, limit_concurrency=MAX_CONNECTIONS)
    config.load()
    config.ssl = ssl_context
    return QuietServer(config, protocol.limits.request_timeout_s)


def public_server(app: Any, limits: ConnectionLimits, ssl_context: ssl.SSLContext | None = None) -> QuietServer:
    """The gateway's public HTTP(S) server."""
    return guarded_server(app, guarded(limits), ssl_context)


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.partition("%")[0]).is_loopback
    except ValueError:  # not an IP address (a unix socket): not a network neighbour
        return True
