"""BoundedServer: pysyncobj 0.3.17's TcpServer with a listener that survives accept() errors.

pysyncobj's TcpServer unbinds for good on any accept() error but EAGAIN. BoundedServer skips the errors that
concern one connection only (_RETRYABLE_ACCEPT); on any other (out of resources: EMFILE, ENFILE, ENOBUFS, ...)
it stops polling the listener for a doubling back-off (TransportLimits.accept_backoff_min_s up to _max_s; the
pending connections wait in the kernel's backlog) and calls `on_exhausted`, with which raft/transport.py sheds
its oldest unfinished handshake. The transport's tick calls `on_tick` to re-arm the listener. Accepted sockets
become connections through `make_connection`, so this module never builds one itself.
"""

from __future__ import annotations

import errno
import socket
from typing import Callable

from pysyncobj.monotonic import monotonic
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import _getAddrType

from raft.bounded_connection import BoundedConnection
from raft.transport_limits import TransportLimits, throttled

_RETRYABLE_ACCEPT = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.ENETDOWN, errno.ENOPROTOOPT,
                     errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH}



class BoundedServer:
    """TcpServer's interface (bind, unbind) with a listener that survives accept() errors: out of file
    descriptors or buffers it stops polling the listener for a back-off (the pending connections wait in
    the kernel's backlog) and asks the transport to shed its oldest unfinished handshake."""

    def __init__(self, poller, host, port, onNewConnection, sendBufferSize=2 ** 13, recvBufferSize=2 ** 13,
                 *, make_connection: Callable[[socket.socket], BoundedConnection], limits: TransportLimits,
                 on_exhausted: Callable[[], None] = lambda: None, clock: Callable[[], float] = monotonic,
                 backlog: int = 64) -> None:
        self._poller = poller
        self._host = host
        self._port = int(port)
        self._family = _getAddrType(host)
        self._send_size = sendBufferSize
        self._recv_size = recvBufferSize
        self._on_new = onNewConnection
        self._make = make_connection
        self._limits = limits
        self._on_exhausted = on_exhausted
        self._clock = clock
        self._backlog = backlog
        self._sock = None
        self._fileno = None
        self._paused_until: float | None = None
        self._backoff = limits.accept_backoff_min_s
        self.pauses = 0  # how often accept() ran out of resources (tests, metrics)

    def bind(self):
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_size)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._recv_size)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            sock.bind((self._host, self._port))
            sock.listen(self._backlog)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._fileno = sock.fileno()
        self._paused_until = None
        self._poller.subscribe(self._fileno, self._on_event, POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR)

    def unbind(self):
        if self._fileno is not None:
            self._poller.unsubscribe(self._fileno)
            self._fileno = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._paused_until = None

    @property
    def paused(self) -> bool:
        return self._paused_until is not None

    def on_tick(self) -> None:
        """Re-arms the listener once its back-off is over (called from the transport's tick)."""
        if self._paused_until is not None and self._clock() >= self._paused_until and self._fileno is not None:
            self._paused_until = None
            self._poller.subscribe(self._fileno, self._on_event, POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR)

    def _pause(self, why: str) -> None:
        self.pauses += 1
        self._poller.unsubscribe(self._fileno)
        self._paused_until = self._clock() + self._backoff
        throttled.warning("accept-" + why, "raft transport: accept() failed (%s); listener paused %.2f s",
                           why, self._backoff)
        self._backoff = min(self._backoff * 2, self._limits.accept_backoff_max_s)
        self._on_exhausted()

    def _on_event(self, descr, event):
        if descr != self._fileno or self._sock is None:
            return
        if event & POLL_EVENT_TYPE.ERROR:
            self._pause("listener error")
            return
        for _ in range(self._limits.accepts_per_event):
            try:
                sock, _addr = self._sock.accept()
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    return
                if e.errno in _RETRYABLE_ACCEPT:
                    continue
                self._pause(errno.errorcode.get(e.errno, str(e.errno)))
                return
            self._backoff = self._limits.accept_backoff_min_s
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_size)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._recv_size)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
                conn = self._make(sock)
            except OSError:  # reset before we got to it
                sock.close()
                continue
            self._on_new(conn)
