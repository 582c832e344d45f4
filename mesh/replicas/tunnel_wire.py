"""What crosses the tunnel between a split model's head member and stage member (mesh/replicas/rpc_tunnel.py)
besides the RPC bytes: the first line the head member sends, and the socket options that bound a wait."""

from __future__ import annotations

import asyncio
import logging
import socket

log = logging.getLogger("quorum.rpc-tunnel")

MAX_MODEL_LINE = 512
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 3, 1, 3
USER_TIMEOUT_S = 6


def model_line(model: str, protocol: tuple[int, ...] | None, ping: bool = False) -> bytes:
    """What the head member sends first: the model's name, its llama.cpp build's RPC protocol version, and
    "ping" on a heartbeat connection (answered "pong" per "ping" line, never reaching the stage)."""
    return (model + (f" rpc={'.'.join(map(str, protocol))}" if protocol else "") + (" ping" if ping else "")
            ).encode() + b"\n"


def read_model_line(line: bytes) -> tuple[str, tuple[int, ...] | None, bool]:
    """(model, the head's RPC protocol version or None, a heartbeat?) from a model line; ("", None, False) if it
    is not one."""
    if not line.endswith(b"\n") or len(line) > MAX_MODEL_LINE:
        return "", None, False
    model, _, rest = line.decode("utf-8", "replace").strip().partition(" ")
    version = None
    for word in rest.split():
        key, _, value = word.partition("=")
        if key == "rpc" and all(part.isdigit() for part in value.split(".")) and value:
            version = tuple(int(part) for part in value.split("."))
    return model, version, "ping" in rest.split()


def nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # asyncio and uvloop set it already on TCP; this only makes sure
        log.debug("TCP_NODELAY not set: %s", exc)


def deadlines(writer: asyncio.StreamWriter) -> None:
    """On a connection between members: a peer that goes silent (its machine frozen, the network cut without a
    reset) ends the connection within seconds rather than never. TCP keepalive probes an idle connection
    (KEEPALIVE_IDLE_S, then every KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT times), and TCP_USER_TIMEOUT drops one
    whose sent bytes stay unacknowledged for USER_TIMEOUT_S (Linux). A frozen stage process on a live member
    is the stage member's to catch (mesh/replicas/stage_process.py): its kernel still acknowledges."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT), ("TCP_USER_TIMEOUT", USER_TIMEOUT_S * 1000)):
        if hasattr(socket, name):  # not every platform has each (macOS lacks TCP_USER_TIMEOUT)
            options.append((socket.IPPROTO_TCP, getattr(socket, name), int(value)))
    for level, option, value in options:
        try:
            sock.setsockopt(level, option, value)
        except OSError as exc:  # an option this kernel refuses: the others still bound the wait
            log.debug("socket option %s not set: %s", option, exc)
