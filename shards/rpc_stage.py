"""A pipeline stage: llama.cpp's RPC server over this machine's CPU, in a process of its own.

    python -m shards.rpc_stage --endpoint 127.0.0.1:0 --cache-dir DIR --threads N --parent PID [--socket PATH]

A head process (shards/rpc_head.py) holding a model's first layers sends this process the tensors
of the last ones and, every step, the graph to compute on them. The server,
`ggml_backend_rpc_start_server`, blocks for good and serves one client at a time: it is the whole
life of this process, which dies with its parent (PR_SET_PDEATHSIG) and offers itself to the OOM
killer first, like a shard process (shards/host.py).

SECURITY: llama.cpp's RPC protocol has no authentication and no encryption, and upstream still fixes
memory-safety bugs in its server: whoever reaches the port can write this process's memory. A stage
therefore binds loopback only (anything else is refused here); a head on another member must reach it
through the mesh's mutual-TLS tunnel, never a port open to the network. Under meshd (`--socket`) the
loopback is the stage's own (a private network namespace) and meshd reaches it through a 0600 Unix
socket, so other users of the machine cannot either (shards/stage_isolation.py).

Protocol with the parent: one JSON line on stdout once the server listens
({"ready": true, "endpoint": "127.0.0.1:PORT", "pid": P}); logs on stderr. Port 0 asks the kernel for
a free port (no race with another process between choosing and binding); the ready line names it.
Readiness is a listening TCP socket owned by this very process (psutil), not a connect probe: a
probe would take the server's one client slot for a moment, and could reach another process that
holds the port while our bind failed.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("quorum.rpc-stage")

READY_TIMEOUT_S = 30.0  # the server listens within milliseconds of the call; this only bounds a stuck start
POLL_S = 0.01


class StageError(RuntimeError):
    """A stage process could not be started or did not come up."""


def parse_endpoint(text: str) -> tuple[str, int]:
    """("127.0.0.1", 5000) from "127.0.0.1:5000" ("[::1]:5000" for IPv6); loopback addresses only."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise StageError(f"not an IP:PORT endpoint: {text!r}") from None
    if not sep or not 0 <= number <= 65535:
        raise StageError(f"not an IP:PORT endpoint: {text!r}")
    if not address.is_loopback:
        raise StageError(f"a stage binds loopback only (the RPC protocol has no authentication): {text!r}")
    return str(address), number


def _listening_port(host: str, port: int) -> int | None:
    """The port of a TCP socket this process listens on at `host` (any port when `port` is 0)."""
    import psutil

    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.ip == host \
                and (port == 0 or conn.laddr.port == port):
            return conn.laddr.port
    return None


def _announce_when_listening(host: str, port: int, ready_fd: int, stopped: threading.Event,
                             front=None, isolated: bool | None = None) -> None:
    """Writes the ready line once the server's socket listens; exits the process if it never does. `front`:
    a listening Unix socket (shards/stage_isolation.py) that hands out connections to the server, then the
    advertised endpoint."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while (bound := _listening_port(host, port)) is None:
        if stopped.is_set():
            return  # the server returned (bind failed): the main thread reports it
        if time.monotonic() > deadline:
            log.error("the RPC server did not listen on %s:%d within %.0f s", host, port, READY_TIMEOUT_S)
            os._exit(3)  # the main thread is inside the C server and cannot be interrupted
        time.sleep(POLL_S)
    endpoint = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
    line = {"ready": True, "endpoint": endpoint, "pid": os.getpid()}
    if front is not None:
        from shards.stage_isolation import broker_forever

        threading.Thread(target=broker_forever, args=(front, host, bound), daemon=True, name="stage-front").start()
        line.update(endpoint=f"unix:{front.getsockname()}", tcp=endpoint, isolated=bool(isolated))
    with os.fdopen(ready_fd, "w") as ready:
        ready.write(json.dumps(line) + "\n")
    log.info("serving the CPU over llama.cpp RPC on %s (%s)", line["endpoint"],
             "through a Unix socket to a private loopback" if isolated else
             "through a Unix socket; the server's loopback port is the machine's" if front else "loopback")


def serve(endpoint: str, cache_dir: str | None, threads: int, ready_fd: int, front=None,
          isolated: bool | None = None) -> None:
    """Runs the RPC server over the CPU device; returns only if the server could not start."""
    from shards import rpc_ggml

    host, port = parse_endpoint(endpoint)
    lib = rpc_ggml.ggml()
    cpu = lib.ggml_backend_dev_by_type(rpc_ggml.DEVICE_TYPE_CPU)
    if not cpu:
        raise StageError("ggml has no CPU device")
    start = rpc_ggml.start_server_fn()
    devices = (ctypes.c_void_p * 1)(cpu)
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    stopped = threading.Event()
    threading.Thread(target=_announce_when_listening, args=(host, port, ready_fd, stopped, front, isolated),
                     daemon=True, name="stage-ready").start()
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # ctypes releases the GIL for the call: the announcing thread runs while the server blocks.
    start(bind.encode(), cache_dir.encode() if cache_dir else None, threads, 1, devices)
    stopped.set()
    raise StageError(f"the RPC server on {bind} stopped (could it bind the port?)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shards.rpc_stage", description=__doc__.split("\n")[0])
    parser.add_argument("--endpoint", default="127.0.0.1:0", help="loopback IP:PORT (0: a free port)")
    parser.add_argument("--cache-dir", default=None, help="keeps large tensors by hash across reloads")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parent", type=int, default=None, help="pid whose death ends this process")
    parser.add_argument("--socket", default=None,
                        help="serve through a Unix socket at this path (mode 0600), the server in a private "
                             "network namespace where the system allows it (shards/stage_isolation.py)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    from shards.child_process import die_with_parent, offer_to_oom_killer

    if args.parent is not None:
        die_with_parent(args.parent)
    offer_to_oom_killer()
    try:
        parse_endpoint(args.endpoint)  # refuse a non-loopback endpoint before loading anything
    except StageError as exc:
        sys.exit(f"rpc_stage: {exc}")
    front, isolated = None, None
    if args.socket:
        from shards.stage_isolation import isolate, private_socket

        why = isolate()  # first: it needs a single-threaded process (ggml not loaded yet)
        isolated = why is None
        if why is not None:
            log.warning("the RPC server's loopback port stays reachable by this machine's other users: %s", why)
        if args.parent is not None:
            die_with_parent(args.parent)  # again, in case entering the user namespace cleared it
        front = private_socket(args.socket)
    # The parent reads one line on stdout: keep that pipe for it alone; the server's own prints
    # (printf to stdout) go to stderr with the logs.
    ready_fd = os.dup(1)
    os.dup2(2, 1)
    import faulthandler

    faulthandler.enable()
    try:
        serve(args.endpoint, args.cache_dir, args.threads, ready_fd, front, isolated)
    except StageError as exc:
        sys.exit(f"rpc_stage: {exc}")


@dataclass
class StageProcess:
    """A running stage started by `start_stage`; kill it with stop() (or let it die with us)."""

    proc: subprocess.Popen
    endpoint: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> "StageProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_stage(endpoint: str = "127.0.0.1:0", cache_dir: str | Path | None = None, threads: int = 1,
                stderr=None, timeout: float = READY_TIMEOUT_S + 30) -> StageProcess:
    """Starts `python -m shards.rpc_stage` as a child that dies with this process, and waits (at most
    `timeout` s) for its ready line. `stderr`: a file for its logs (default: ours).

    PR_SET_PDEATHSIG follows the thread that forks: call this from a thread that lives as long as the
    stage should (the main thread, or the supervisor's own)."""
    parse_endpoint(endpoint)
    args = [sys.executable, "-m", "shards.rpc_stage", "--endpoint", endpoint, "--threads", str(threads),
            "--parent", str(os.getpid()), *(["--cache-dir", str(cache_dir)] if cache_dir else [])]
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=repo)
    try:
        line = _read_line(proc, timeout)
        ready = json.loads(line) if line else {}
    except (TimeoutError, ValueError) as exc:
        proc.kill()
        proc.wait(timeout=10)
        raise StageError(f"the stage did not start: {exc}") from exc
    except BaseException:
        proc.kill()
        proc.wait(timeout=10)
        raise
    if not ready.get("ready"):
        code = proc.wait(timeout=10)
        raise StageError(f"the stage exited with {code} before it was ready")
    return StageProcess(proc, ready["endpoint"])


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line from the child's stdout within `timeout` s; "" if it closed stdout (exited) first."""
    deadline = time.monotonic() + timeout
    data = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no ready line within {timeout:.0f} s")
            if not sel.select(left):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                return ""
            data += chunk
    return data.decode()


if __name__ == "__main__":
    main()
