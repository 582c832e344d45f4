"""BoundedConnection: pysyncobj 0.3.17's TcpConnection with a frame cap, linear-time buffers and the
journal barrier before every write.

pysyncobj's TcpConnection buffers with `bytes +=` (quadratic), reads a frame of any announced length and times
a connection out only when it has an event (the handshake deadline for a silent one is enforced by
raft/transport.py from the tick). The framing is pysyncobj's (a 4-byte native int length, then
Fernet(zlib(message)), the per-connection random keys of TCPTransport) but a message is raft/codec.py's typed
encoding, not a pickle: a frame that decrypts is decoded into None/bool/int/float/str/bytes/list/tuple/dict
only, and anything else closes the connection. Members running pysyncobj's stock transport (pickle) cannot
talk to these: every member of a mesh runs the same transport.

BoundedConnection re-implements TcpConnection's public interface instead of subclassing it (its internals are
name-mangled, so subclassing would mean reaching into them). With a barrier (the journal's sync, batch mode)
nothing queued leaves through the socket before it has run; with `defer_writes` a send only queues and the
bytes go on the poller's next WRITE event, so every entry appended during a tick shares one fsync.

With `tls` (raft/tls.py) the same frames travel inside TLS, sans-IO (socket bytes -> session -> read buffer;
frames -> session -> write buffer), the handshake on the same events. Until it is done `state` reads CONNECTING
and an outgoing connection is not reported connected; `peer_id` is the node id in the peer's certificate.
"""

from __future__ import annotations

import errno
import socket
import ssl
import struct
import zlib
from typing import Callable

from pysyncobj.monotonic import monotonic
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE, _getAddrType, set_keepalive

from raft import codec
from raft.journal import JournalFailed
from raft.tls import RaftTls, TlsSession
from raft.transport_limits import TransportLimits, throttled

_LEN = struct.Struct("i")  # pysyncobj's frame header: a native int
_BAD = object()


class BoundedConnection:
    """TcpConnection's interface (send, connect, disconnect, fileno, state, callbacks, the random keys and
    the encryptor that TCPTransport sets) over a bytearray read buffer that never holds more than one frame
    beyond what was parsed, and a bytearray write buffer."""

    def __init__(self, poller, onMessageReceived=None, onConnected=None, onDisconnected=None, socket=None,
                 timeout=10.0, sendBufferSize=2 ** 13, recvBufferSize=2 ** 13, keepalive=None, *,
                 limits: TransportLimits = TransportLimits(), barrier: Callable[[], None] | None = None,
                 defer_writes: bool = False, clock: Callable[[], float] = monotonic,
                 tls: RaftTls | None = None) -> None:
        self.sendRandKey = None
        self.recvRandKey = None
        self.recvLastTimestamp = 0
        self.encryptor = None
        self.incoming = socket is not None
        self.handshake_done = False
        self.peer = None  # (ip, port) of an accepted connection
        self.peer_id: str | None = None  # with TLS: the node id in the peer's certificate, once verified
        self._tls_conf = tls
        self._tls: TlsSession | None = None
        self._limits = limits
        self._barrier = barrier
        self._defer = defer_writes
        self._clock = clock
        self._poller = poller
        self._timeout = timeout
        self._keepalive = keepalive
        self._send_size = sendBufferSize
        self._recv_size = recvBufferSize
        self._rbuf = bytearray()
        self._wbuf = bytearray()
        self._mask = 0
        self._generation = 0  # bumped by disconnect: callbacks may disconnect and even reconnect us
        self._on_message = onMessageReceived
        self._on_connected = onConnected
        self._on_disconnected = onDisconnected
        self.opened_at = self._last_read = clock()
        if socket is not None:
            self._sock = socket
            self._fileno = socket.fileno()
            self._state = CONNECTION_STATE.CONNECTED
            try:
                self.peer = socket.getpeername()[:2]
            except OSError:  # already reset by the peer: the first event will close it
                self.peer = ("?", 0)
            self.setSockoptKeepalive()
            if tls is not None:
                self._tls = TlsSession(tls.server_context, server_side=True)
            self._subscribe(POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.WRITE | POLL_EVENT_TYPE.ERROR)
        else:
            self._sock = None
            self._fileno = None
            self._state = CONNECTION_STATE.DISCONNECTED

    # ---- TcpConnection's interface -----------------------------------------------------------------

    @property
    def state(self):
        if self._tls is not None and not self._tls.established and self._state == CONNECTION_STATE.CONNECTED:
            return CONNECTION_STATE.CONNECTING  # TLS handshake under way: nothing may be sent yet
        return self._state

    def fileno(self):
        return self._fileno

    def setOnConnectedCallback(self, onConnected):
        self._on_connected = onConnected

    def setOnMessageReceivedCallback(self, onMessageReceived):
        self._on_message = onMessageReceived

    def setOnDisconnectedCallback(self, onDisconnected):
        self._on_disconnected = onDisconnected

    def setSockoptKeepalive(self):
        if self._sock is not None and self._keepalive is not None:
            set_keepalive(self._sock, *self._keepalive)

    def getSendBufferSize(self):
        return len(self._wbuf)

    def connect(self, host, port):
        if host is None:
            return False
        self._state = CONNECTION_STATE.DISCONNECTED
        self._fileno = None
        self._sock = socket.socket(_getAddrType(host), socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_size)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._recv_size)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.setSockoptKeepalive()
        self._sock.setblocking(False)
        self._rbuf = bytearray()
        self._wbuf = bytearray()
        self.handshake_done = False
        self._tls = None
        self.peer_id = None
        self.peer = (host, port)
        self.opened_at = self._last_read = self._clock()
        try:
            self._sock.connect((host, port))
        except OSError as e:
            if e.errno not in (errno.EINPROGRESS, errno.EWOULDBLOCK):
                self._sock.close()  # pysyncobj leaks this socket until the next connect()
                self._sock = None
                return False
        self._fileno = self._sock.fileno()
        self._state = CONNECTION_STATE.CONNECTING
        self._mask = 0
        self._subscribe(POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.WRITE | POLL_EVENT_TYPE.ERROR)
        return True

    def send(self, message):
        if self._sock is None:
            return
        if self.sendRandKey:
            message = (self.sendRandKey, message)
        try:
            data = zlib.compress(codec.dumps(message), 3)
        except codec.CodecError as exc:  # a bug on this side, not the peer's: report it, keep the connection
            throttled.warning("send-codec", "raft transport: could not encode an outgoing %s: %s",
                               type(message).__name__, exc)
            return
        if self.encryptor:
            data = self.encryptor.encrypt_at_time(data, int(monotonic()))
        if len(data) > self._limits.max_frame_bytes:
            # The peer would close the connection on it; dropping it is a lost message, which Raft survives.
            throttled.warning("send-cap", "raft transport: dropped an outgoing %s frame of %d bytes (cap %d)",
                               type(message).__name__, len(data), self._limits.max_frame_bytes)
            return
        if self._tls is not None and not self._tls.established:  # pysyncobj checks `state` first: never here
            throttled.warning("send-early", "raft transport: dropped a message sent to %s before TLS", self.peer)
            return
        if len(self._wbuf) + len(data) + _LEN.size > self._limits.max_send_buffer_bytes:
            throttled.warning("send-buffer", "raft transport: closing a connection to %s with %d bytes unsent",
                               self.peer, len(self._wbuf))
            self.disconnect()
            return
        if self._tls is not None:
            self._wbuf += self._tls.encrypt(_LEN.pack(len(data)) + data)
        else:
            self._wbuf += _LEN.pack(len(data))
            self._wbuf += data
        if self._defer:
            self._update_mask()
        else:
            self._try_send()

    def disconnect(self):
        call = self._on_disconnected is not None and self._state != CONNECTION_STATE.DISCONNECTED
        self._generation += 1
        self.sendRandKey = None
        self.recvRandKey = None
        self.recvLastTimestamp = 0
        self.handshake_done = False
        self._tls = None
        self.peer_id = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._fileno is not None:
            self._poller.unsubscribe(self._fileno)
            self._fileno = None
        self._mask = 0
        self._wbuf = bytearray()
        self._rbuf = bytearray()
        self._state = CONNECTION_STATE.DISCONNECTED
        if call:
            self._on_disconnected()

    # ---- events ------------------------------------------------------------------------------------

    def _subscribe(self, mask: int) -> None:
        if mask != self._mask and self._fileno is not None:
            self._poller.subscribe(self._fileno, self._on_event, mask)
            self._mask = mask

    def _update_mask(self) -> None:
        if self._state == CONNECTION_STATE.CONNECTING:
            return  # still subscribed for WRITE, which tells us the connect finished
        mask = POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR
        if self._wbuf:
            mask |= POLL_EVENT_TYPE.WRITE
        self._subscribe(mask)

    def _timed_out(self) -> bool:
        if self._clock() - self._last_read > self._timeout:
            self.disconnect()
            return True
        return False

    def _on_event(self, descr, event):
        if descr != self._fileno:
            self._poller.unsubscribe(descr)
            return
        if event & POLL_EVENT_TYPE.ERROR:
            self.disconnect()
            return
        if self._timed_out():
            return
        generation = self._generation
        if self._state == CONNECTION_STATE.CONNECTING:
            if self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self.disconnect()
                return
            if self._tls_conf is not None:  # connected once the TLS handshake is done (_tls_handshake)
                self._state = CONNECTION_STATE.CONNECTED
                self._last_read = self._clock()
                self._tls = TlsSession(self._tls_conf.client_context, server_side=False)
                self._tls_handshake()
                return
            if self._on_connected is not None:
                self._on_connected()
            if generation != self._generation:
                return
            self._state = CONNECTION_STATE.CONNECTED
            self._last_read = self._clock()
            self._update_mask()
            return
        if event & POLL_EVENT_TYPE.WRITE:
            self._try_send()
            if generation != self._generation:
                return
        if event & POLL_EVENT_TYPE.READ:
            self._try_read()
            if generation != self._generation:
                return
            self._parse()

    def _try_send(self) -> None:
        if self._timed_out():
            return
        if self._wbuf and self._barrier is not None:
            try:
                self._barrier()
            except (OSError, JournalFailed):  # logged by the journal: what is queued may not leave
                self.disconnect()
                return
        while self._wbuf:
            try:
                sent = self._sock.send(self._wbuf)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    self.disconnect()
                    return
                break
            if sent <= 0:
                break
            del self._wbuf[:sent]  # O(1) in CPython: a bytearray drops its head without copying
        self._update_mask()

    def _try_read(self) -> None:
        # Reads until the socket is drained or one whole frame is buffered (then parses and lets the poller
        # call again: it is level-triggered), so memory stays within a frame and one recv.
        limit = self._limits.max_frame_bytes + _LEN.size
        while len(self._rbuf) < limit:
            try:
                chunk = self._sock.recv(self._recv_size)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    self.disconnect()
                    return
                break
            if not chunk:
                self.disconnect()
                return
            if self._tls is None:
                self._rbuf += chunk
            elif not self._tls_feed(chunk):
                return
            if len(self._rbuf) >= _LEN.size and not self._length_ok(_LEN.unpack_from(self._rbuf)[0]):
                return
        self._last_read = self._clock()

    # ---- TLS (raft/tls.py) --------------------------------------------------------------------------

    def _tls_feed(self, chunk: bytes) -> bool:
        """Ciphertext from the socket: the handshake's next step, then plaintext into the read buffer.
        False when the connection is closed."""
        self._tls.incoming.write(chunk)
        if not self._tls.established and (not self._tls_handshake() or not self._tls.established):
            return self._sock is not None
        try:
            self._rbuf += self._tls.read()
        except ssl.SSLError as exc:  # includes the peer's close_notify (SSLZeroReturnError)
            throttled.warning("tls-record", "raft transport: closed a TLS connection with %s: %r", self.peer, exc)
            self.disconnect()
            return False
        out = self._tls.take()  # post-handshake messages (key updates)
        if out:
            self._wbuf += out
            self._try_send()
        return self._sock is not None

    def _tls_handshake(self) -> bool:
        """One step of the TLS handshake; False when the connection was closed (bad certificate, garbage,
        or the connected callback closed it)."""
        generation = self._generation
        try:
            done = self._tls.handshake()
        except ssl.SSLError as exc:  # a certificate the CA did not sign, none at all, or not TLS
            throttled.warning("tls-handshake", "raft transport: TLS handshake %s %s failed: %s",
                               "from" if self.incoming else "to", self.peer, exc)
            self.disconnect()
            return False
        self._wbuf += self._tls.take()
        if done:
            self.peer_id = self._tls.peer_id
            self._last_read = self._clock()
            if not self.incoming and self._on_connected is not None:
                self._on_connected()  # raft/transport.py checks `peer_id` against the address dialled
                if generation != self._generation:
                    return False
        self._try_send()
        return generation == self._generation

    def _length_ok(self, length: int) -> bool:
        if 0 <= length <= self._limits.max_frame_bytes:
            return True
        throttled.warning("frame-cap", "raft transport: closed a connection from %s announcing a %d-byte frame "
                           "(cap %d)", self.peer, length, self._limits.max_frame_bytes)
        self.disconnect()
        return False

    def _parse(self) -> None:
        generation, buf, pos = self._generation, self._rbuf, 0
        while len(buf) - pos >= _LEN.size:
            (length,) = _LEN.unpack_from(buf, pos)
            if not self._length_ok(length):
                return
            end = pos + _LEN.size + length
            if len(buf) < end:
                break
            message = self._decode(bytes(buf[pos + _LEN.size:end]))
            pos = end
            if message is _BAD:
                self.disconnect()
                return
            if self._on_message is not None:
                self._on_message(message)
            if generation != self._generation:
                return
        del buf[:pos]

    def _decode(self, data: bytes):
        try:
            if self.encryptor:
                timestamp = self.encryptor.extract_timestamp(data)
                if timestamp < self.recvLastTimestamp:
                    raise ValueError("frame older than the previous one")
                self.recvLastTimestamp = timestamp
                data = self.encryptor.decrypt(data)
            inflate = zlib.decompressobj()
            raw = inflate.decompress(data, self._limits.max_message_bytes)
            if inflate.unconsumed_tail:
                raise ValueError(f"message inflates beyond {self._limits.max_message_bytes} bytes")
            message = codec.loads(raw)
            if self.recvRandKey:
                if type(message) is not tuple or len(message) != 2:
                    raise ValueError("a message without its connection key")
                rand_key, message = message
                if rand_key != self.recvRandKey:
                    raise ValueError("wrong connection key")
        except Exception as exc:  # anything a forged frame can raise: the connection goes, the node stays
            throttled.warning("bad-frame", "raft transport: closed a connection from %s after a frame that "
                               "failed to decode: %r", self.peer, exc)
            return _BAD
        return message
