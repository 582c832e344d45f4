"""Keeping a stage's RPC port from other users of the same machine (Linux).

ggml's RPC server listens on TCP host:port only (`ggml_backend_rpc_start_server` takes "host:port"; no Unix
socket, no authentication), so on loopback any local user could connect to it between two head connections
and write the stage's memory. Without patching llama.cpp, a stage closes that hole this way:

1. Before anything else (the process must still be single-threaded), it enters a network namespace of its own
   (`unshare(CLONE_NEWUSER | CLONE_NEWNET)`: unprivileged, through a user namespace), brings up the loopback
   interface there, and the RPC server binds that namespace's 127.0.0.1: no other process on the machine has
   that loopback.
2. meshd reaches it through a Unix socket, mode 0600 in meshd's 0700 run directory (only meshd's user): for each
   connection there, the stage opens a TCP connection to its server inside its namespace and hands the socket
   over (SCM_RIGHTS), so meshd then talks to the server directly, without a copy in between (a relay thread
   cost a quarter of the tokens/s on a busy 2-core machine).

Where user namespaces are off (some distributions disable them for unprivileged users, some Android kernels
lack them) `isolate()` says why and the stage serves on the machine's loopback as before (README, honest
limits); the Unix socket stays its only advertised door.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import socket
import struct
import time

log = logging.getLogger("quorum.stage-isolation")

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
CONNECT_TIMEOUT_S = 5.0


def isolate() -> str | None:
    """Moves this (single-threaded) process into a network namespace of its own with loopback up. None on
    success; otherwise why not (and nothing changed)."""
    if not hasattr(os, "getuid") or not os.path.exists("/proc/self/ns/net"):
        return "no Linux namespaces on this system"
    uid, gid = os.getuid(), os.getgid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        return f"unshare(CLONE_NEWUSER | CLONE_NEWNET) failed: {os.strerror(ctypes.get_errno())}"
    try:
        # Map our own ids, so files the stage writes (its cache) look as they are; optional for the network.
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                           ("/proc/self/gid_map", f"{gid} {gid} 1")):
            with open(path, "w") as f:
                f.write(text)
        _loopback_up()
    except OSError as exc:  # namespaced but without a loopback: the server could not listen; say so loudly
        return f"a private network namespace without loopback: {exc}"
    return None


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def private_socket(path: str) -> socket.socket:
    """A listening Unix socket at `path` that only this user may connect to (mode 0600)."""
    if os.path.lexists(path):
        os.unlink(path)  # left by a stage that was killed
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        server.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    server.listen(4)
    return server


def broker_forever(server: socket.socket, host: str, port: int) -> None:
    """For each connection on `server` (meshd's), opens a TCP connection to the RPC server at host:port (in this
    process's namespace) and hands it over as a file descriptor (SCM_RIGHTS): meshd then talks to the server
    directly, with no copy in between. A connection that cannot be opened is answered b"no"."""
    while True:
        try:
            client, _ = server.accept()
        except OSError as exc:  # out of descriptors, an aborted connection: this one is lost, the next may come
            log.warning("could not accept a connection from meshd: %s", exc)
            time.sleep(0.1)  # a back-off, so a lasting error (EMFILE) does not spin
            continue
        with client:
            try:
                upstream = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
            except OSError as exc:  # the server is gone: the stage process is ending; meshd is told
                log.warning("the RPC server does not answer on %s:%d: %s", host, port, exc)
                _send(client, b"no", [])
                continue
            with upstream:
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _send(client, b"ok", [upstream.fileno()])


def _send(client: socket.socket, message: bytes, fds: list[int]) -> None:
    try:
        socket.send_fds(client, [message], fds)
    except OSError as exc:  # meshd went away meanwhile: nothing to hand over
        log.info("could not hand a connection to meshd: %s", exc)


def receive_connection(path: str, timeout: float = 10.0, deadline: float | None = None) -> socket.socket:
    """meshd's side of `broker_forever`: a TCP connection to the stage's RPC server, from the stage's Unix
    socket at `path` (blocking: run it in a thread). The whole call, connecting and waiting for the handover
    together, ends by `deadline` (time.monotonic()), else `timeout` seconds from now: give it the caller's own
    deadline, so the thread is done when its caller stops waiting. OSError when the stage hands none over,
    TimeoutError when the deadline passes first."""
    if deadline is None:
        deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as broker:
        broker.settimeout(_left(deadline, path))
        broker.connect(path)
        broker.settimeout(_left(deadline, path))
        # Close-on-exec as soon as it arrives: an inherited copy in a shard process meshd starts would keep this
        # connection open after meshd closes it, and the stage's RPC server, which serves one connection at a time,
        # would wait on it for as long as that child lives (seen: 2 minutes). MSG_CMSG_CLOEXEC where the kernel
        # honours it, and set_inheritable, which always does.
        message, fds, _, _ = socket.recv_fds(broker, 16, 1, getattr(socket, "MSG_CMSG_CLOEXEC", 0))
    for fd in fds:
        os.set_inheritable(fd, False)
    if message != b"ok" or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ConnectionRefusedError(f"the stage at {path} handed over no connection ({message!r})")
    return socket.socket(fileno=fds[0])


def _left(deadline: float, path: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"the stage at {path} handed over no connection in time")
    return left
