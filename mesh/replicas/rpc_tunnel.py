"""The mutual-TLS tunnel between a split model's head and its stages (llama.cpp RPC carried between members).

llama.cpp's RPC protocol has no authentication and no encryption, and whoever reaches a stage can write its
memory. So a stage process binds loopback only (shards/rpc_stage.py) and members reach it only through this
tunnel:

    head process --tcp--> HeadTunnel (head member, 127.0.0.1:EPHEMERAL, one per stage)
                 --TLS, member certificates both ways--> StageTunnelServer (stage member, tunnel port)
                 --tcp--> the stage process (stage member: its private loopback, the connection handed over
                          by its 0600 Unix socket; shards/stage_isolation.py)

- The stage member's listener requires a client certificate from the mesh CA naming a member (its node id in
  the common name and in the SAN `ID.quorum-node`, as every member certificate has), and then asks
  `authorize(node_id, model)`: only the live head member of that model's split, recorded in Raft, gets the
  loopback endpoint of the stage serving it. Anyone else (no certificate, another mesh's, a member that is
  not the head) is closed before a byte reaches the stage.
- The head member dials with SNI and hostname check on `STAGE_ID.quorum-node`, so only that stage member's
  certificate completes the handshake (mesh/security/peer_tls.py does the same for the peer port).
- After the handshake the head sends one line, the model's name (so one tunnel port serves the stages of
  several split models on a member) and its llama.cpp build's RPC protocol version: a stage member of another
  build refuses it and reports its stage "failed" with the reason, before ggml's client would abort the head.
- The head member's loopback port speaks for this member, so it takes connections only from processes of
  meshd's own user (the owner of the connecting socket, from /proc/net/tcp), as the shard sockets in meshd's
  0700 run directory do. Where /proc/net/tcp cannot be read (some Android versions), that check is skipped.

The tunnel port is the member's HTTP listen port + 4 (`tunnel_address_of`), after gRPC (+1), Raft (+2) and the
peer port (+3); it is bound only while the member holds a stage. Bytes are copied as they come (TCP_NODELAY
both ways: a decode step is a few small round trips). When either side of a pipe ends, both are closed: a
stage that dies ends its head's connection at once (the head process then aborts and is restarted). TCP
keepalive and TCP_USER_TIMEOUT (mesh/replicas/tunnel_wire.py), and the head member's heartbeat to the stage
member's meshd (a ping a second on a connection of its own, SILENT_S without a pong closes the head's
connections), bound the wait on a stage member that goes silent; a frozen stage process is its own member's
to catch (mesh/replicas/stage_process.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
from typing import Callable

from mesh.replicas.tunnel_wire import deadlines, model_line, nodelay, read_model_line
from mesh.security.pki import node_dns_name

log = logging.getLogger("quorum.rpc-tunnel")

TUNNEL_PORT_OFFSET = 4  # from the member's HTTP listen port
HANDSHAKE_TIMEOUT_S = 5.0  # TLS handshake and the model line
DIAL_TIMEOUT_S = 10.0
CHUNK = 1 << 16
PING_EVERY_S = 1.0  # the head member's heartbeat to a stage member, while a head is connected
SILENT_S = 6.0  # no answer for this long: the stage member is taken for frozen


def tunnel_address_of(member) -> str:
    """host:port of a member's tunnel listener (its HTTP address's host, the port + TUNNEL_PORT_OFFSET)."""
    host, _, port = member.http_address.rpartition(":")
    return f"{host}:{int(port) + TUNNEL_PORT_OFFSET}"


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def peer_node_id(cert: dict | None) -> str | None:
    """The member a verified certificate names: its common name, when the SAN names it too (as `node_id_of`)."""
    cn = next((value for rdn in (cert or {}).get("subject", ()) for key, value in rdn if key == "commonName"), None)
    names = {value for kind, value in (cert or {}).get("subjectAltName", ()) if kind == "DNS"}
    return cn if cn and node_dns_name(cn) in names else None


def peer_uid(writer: asyncio.StreamWriter) -> int | None:
    """The user owning the other end of a loopback IPv4 connection (Linux /proc/net/tcp); None if unknown."""
    peer, ours = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
    if not peer or not ours:
        return None

    def hex_address(address: tuple) -> str:
        return f"{int.from_bytes(socket.inet_aton(address[0]), 'little'):08X}:{address[1]:04X}"

    local, remote = hex_address(peer), hex_address(ours)  # the peer socket's own view: local = its address
    try:
        with open("/proc/net/tcp") as table:
            for line in table:
                fields = line.split()
                if len(fields) > 7 and fields[1] == local and fields[2] == remote:
                    return int(fields[7])
    except OSError as exc:  # no /proc, or a system that hides it: the caller decides what unknown means
        log.debug("cannot read /proc/net/tcp: %s", exc)
    return None


async def _dial_stage(endpoint: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to a stage process: at host:port, or, for "unix:PATH", the connection its Unix socket hands
    over (shards/stage_isolation.py: its server lives in a network namespace of its own)."""
    if not endpoint.startswith("unix:"):
        return await asyncio.open_connection(*_host_port(endpoint))
    from shards.stage_isolation import receive_connection

    deadline = time.monotonic() + DIAL_TIMEOUT_S  # the thread ends by the caller's own wait
    sock = await asyncio.to_thread(receive_connection, endpoint[5:], deadline=deadline)
    sock.setblocking(False)
    return await asyncio.open_connection(sock=sock)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
        pass  # one side went away (reset, TLS alert): the splice ends and closes both sides


async def splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    """Copies both ways until either side ends, then closes both."""
    tasks = [asyncio.create_task(_pipe(a[0], b[1])), asyncio.create_task(_pipe(b[0], a[1]))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # CancelledError: the end we asked for
        await _close(a[1])
        await _close(b[1])


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError, asyncio.TimeoutError):
        # closing a connection the peer already dropped may raise; it is closed either way
        await asyncio.wait_for(writer.wait_closed(), 2.0)


class _Connections:
    """The connections a listener is serving, closed together when it closes."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()

    def track(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # cancelled on purpose


class _Listener:
    """A listening socket whose connections (each served by `_serve`) are closed with it."""

    def __init__(self) -> None:
        self._server: asyncio.AbstractServer | None = None
        self._connections = _Connections()

    async def _listen(self, host: str, port: int, **kwargs) -> None:
        self._server = await asyncio.start_server(self._tracked, host, port, **kwargs)

    @property
    def bound_port(self) -> int:
        return self._server.sockets[0].getsockname()[1] if self._server else 0

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._connections.close()  # first: from Python 3.12 wait_closed() waits for open connections
        if self._server is not None:
            await self._server.wait_closed()

    async def _tracked(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.track()
        await self._serve(reader, writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class StageTunnelServer(_Listener):
    """On a stage member: TLS with a required member certificate, then the stage that `authorize` names."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext,
                 authorize: Callable[[str, str], str | None], protocol: tuple[int, ...] | None = None,
                 on_mismatch: Callable[[str, str], None] | None = None) -> None:
        """`context`: a server context (this member's certificate, the mesh CA); client certificates are
        made required here. `authorize(node_id, model)` -> the stage's endpoint (loopback host:port or
        unix:PATH), or None.
        `protocol`: this member's RPC protocol version; a head that sends another major version is refused
        and `on_mismatch(model, reason)` told (a stage from another llama.cpp build cannot serve it)."""
        super().__init__()
        context.verify_mode = ssl.CERT_REQUIRED
        self.host, self.port, self.context, self.authorize = host, port, context, authorize
        self.protocol, self.on_mismatch = protocol, on_mismatch
        self.refused = 0  # connections closed before reaching a stage (tests and logs)

    async def start(self) -> None:
        await self._listen(self.host, self.port, ssl=self.context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        log.info("stage tunnel listening on %s:%d (mutual TLS, the split's head member only)", self.host, self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        caller = peer_node_id(writer.get_extra_info("peercert"))
        try:
            line = await asyncio.wait_for(reader.readline(), HANDSHAKE_TIMEOUT_S)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ValueError) as exc:
            return await self._refuse(writer, f"{caller or 'unknown'} sent no model line ({type(exc).__name__})")
        model, version, ping = read_model_line(line)
        if not model:
            return await self._refuse(writer, f"{caller or 'unknown'} sent no model line")
        endpoint = self.authorize(caller, model) if caller else None
        if endpoint is None:
            return await self._refuse(writer, f"{caller or 'a caller without a member id'} is not the head of "
                                              f"{model!r}'s pipeline, or no stage of it runs here")
        if version and self.protocol and version[0] != self.protocol[0]:
            reason = (f"another llama.cpp build: this stage speaks RPC protocol {'.'.join(map(str, self.protocol))}, "
                      f"its head {'.'.join(map(str, version))}; run the same build on every member")
            if self.on_mismatch is not None:
                self.on_mismatch(model, reason)
            return await self._refuse(writer, f"{caller} for {model!r}: {reason}")
        if ping:
            return await self._pong(reader, writer)
        try:
            stage = await asyncio.wait_for(_dial_stage(endpoint), DIAL_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as exc:
            return await self._refuse(writer, f"the stage of {model!r} at {endpoint} does not answer: {exc}")
        nodelay(writer)
        deadlines(writer)
        nodelay(stage[1])
        await splice((reader, writer), stage)

    async def _pong(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The head member's heartbeat: "pong" per "ping", answered by this meshd (its event loop running)."""
        try:
            while await reader.readline() == b"ping\n":
                writer.write(b"pong\n")
                await writer.drain()
        except (OSError, ssl.SSLError, ValueError):
            pass  # the head member went away (or sent a line beyond the limit): its heartbeat ends here
        await _close(writer)

    async def _refuse(self, writer: asyncio.StreamWriter, why: str) -> None:
        self.refused += 1
        log.warning("stage tunnel: refused: %s", why)
        await _close(writer)


class HeadTunnel(_Listener):
    """On the head member: a loopback port that the head process talks RPC to; each connection is carried
    over TLS to one stage member's tunnel, which must present that member's certificate."""

    def __init__(self, model: str, target: Callable[[], tuple[str, str] | None],
                 context: Callable[[], ssl.SSLContext], protocol: tuple[int, ...] | None = None) -> None:
        """`target()` -> (tunnel address, node id) of the stage member now (None: no such member);
        `context()` -> a client context with this member's certificate, trusting the mesh CA; `protocol`:
        this member's RPC protocol version, told to the stage member (which refuses another build's)."""
        super().__init__()
        self.model, self.target, self.context, self.protocol = model, target, context, protocol
        self._spliced = 0  # head connections being carried
        self._heartbeat: asyncio.Task | None = None

    async def start(self) -> str:
        """Listens on 127.0.0.1 (a free port); returns the endpoint for the head process."""
        await self._listen("127.0.0.1", 0)
        return self.endpoint

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.bound_port}" if self._server else ""

    async def close(self) -> None:
        await _cancel(self._heartbeat)
        await super().close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = peer_uid(writer)
        if uid is not None and uid != os.getuid():
            log.warning("tunnel for %s: refused a local connection from user %d (only meshd's user)", self.model, uid)
            return await _close(writer)
        try:
            remote = await self._dial()
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
            log.warning("tunnel for %s: %s", self.model, exc)
            return await _close(writer)
        nodelay(writer)
        self._spliced += 1
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._listen_for_silence(), name=f"tunnel-heartbeat-{self.model}")
        try:
            await splice((reader, writer), remote)
        finally:
            self._spliced -= 1

    async def _dial(self, ping: bool = False) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TLS connection to the stage member's tunnel, the model line sent (OSError, ssl.SSLError or a timeout
        with the reason otherwise)."""
        target = self.target()
        if target is None:
            raise ConnectionRefusedError("the stage member is gone")
        address, node_id = target
        context = self.context()
        context.check_hostname = True  # against node_id's name, sent as the SNI
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(*_host_port(address), ssl=context, server_hostname=node_dns_name(node_id),
                                        ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S), DIAL_TIMEOUT_S)
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
            raise type(exc)(f"cannot reach the stage member {node_id} at {address}: {exc}") from exc
        writer.write(model_line(self.model, self.protocol, ping))
        nodelay(writer)
        deadlines(writer)
        return reader, writer

    async def _listen_for_silence(self) -> None:
        """While the head process is connected: a ping to the stage member's meshd every PING_EVERY_S on a
        connection of its own. Silence for SILENT_S (its meshd or machine frozen, the network cut without a
        reset: the kernel may still acknowledge, so TCP alone would wait) closes the head's connections, so the
        head aborts and its streams resume elsewhere. A refusal answers (a stage restarting: its meshd runs, its
        port is closed): dialled again. Any other failure to get a pong (a handshake that times out on a frozen
        meshd, whose kernel still accepts) counts toward the silence."""
        heard = asyncio.get_running_loop().time()

        def left() -> float:
            return heard + SILENT_S - asyncio.get_running_loop().time()

        while self._spliced:
            await asyncio.sleep(PING_EVERY_S)  # first: a connection refused at once ends before any ping
            try:
                reader, writer = await asyncio.wait_for(self._dial(ping=True), max(left(), 0.01))
            except ConnectionRefusedError as exc:
                heard = asyncio.get_running_loop().time()
                log.debug("tunnel for %s: heartbeat refused: %s", self.model, exc)
                continue
            except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
                if left() <= 0:
                    return await self._silent()
                log.debug("tunnel for %s: no heartbeat connection: %s", self.model, exc)
                continue
            try:
                while self._spliced:
                    writer.write(b"ping\n")
                    if not await asyncio.wait_for(reader.readline(), max(left(), 0.01)):
                        break  # the stage member closed it (its stage ended): dialled again
                    heard = asyncio.get_running_loop().time()
                    await asyncio.sleep(PING_EVERY_S)
            except asyncio.TimeoutError:
                return await self._silent()
            except (OSError, ssl.SSLError) as exc:  # a reset: the data connection ends the same way
                log.debug("tunnel for %s: heartbeat connection lost: %s", self.model, exc)
            finally:
                await _close(writer)

    async def _silent(self) -> None:
        log.error("tunnel for %s: the stage member did not answer for %.0f s; closing the head's connections",
                  self.model, SILENT_S)
        await self._connections.close()


async def _cancel(task: asyncio.Task | None) -> None:
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)  # cancelled on purpose
