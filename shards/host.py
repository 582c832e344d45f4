"""A shard process: one model shard served over gRPC on a Unix socket, started by meshd.

    python -m shards.host SPEC_JSON

llama.cpp and onnxruntime run here, never in meshd: a crash in a model library (SIGSEGV from a
bad build, GGML_ABORT, the OOM killer) costs this process, and meshd restarts it (see
mesh/replicas/shard_process.py). The process speaks the same Shard service (Generate, Health, Embed) as a
member's gRPC port, on a Unix socket in meshd's private run directory (mode 0700: only meshd's
user can connect, the same protection as the member's key file beside it); the server accepts
only local (UDS) connections.

Protocol with the parent: one JSON line on stdout once the shard is serving
({"ready": true, "n_ctx": N, "pid": P}); logs, one line each, on stderr. SIGTERM stops it (it runs
in a session of its own, so a terminal's Ctrl-C reaches meshd, which stops its shards).
The process dies with its parent (PR_SET_PDEATHSIG) and offers itself to the OOM killer first.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass

log = logging.getLogger("quorum.shard-host")

PR_SET_PDEATHSIG = 1
OOM_SCORE_ADJ = 1000  # the most killable: a shard, never meshd, goes when memory runs out


@dataclass(frozen=True)
class HostSpec:
    role: str
    model: str
    kind: str  # backend file: llama, onnx, null
    path: str
    n_ctx: int
    threads: int
    queue_depth: int
    socket: str
    parent: int
    chat_template: str | None = None
    # Generations a llama.cpp shard decodes together (continuous batching, shards/backend_llama_batch.py).
    # Each slot has its own window of n_ctx tokens, so the KV cache is parallel x n_ctx tokens
    # (Gemma 3 270M: ~18 KB a token). 1: one generation at a time in a single-sequence context.
    parallel: int = 4

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> "HostSpec":
        return cls(**json.loads(text))


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when the parent dies (Linux); exit now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent:
        sys.exit("the parent meshd is gone")


def offer_to_oom_killer() -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE_ADJ))
    except OSError as exc:  # not Linux, or /proc read-only: the OOM killer picks by size alone
        log.info("could not raise oom_score_adj: %s", exc)


def open_shard(spec: HostSpec):
    """The backend loaded and wrapped: LocalShard for a generator, ContextShard for an encoder."""
    from shards.backend import load_backend

    if spec.kind == "onnx":
        backend = load_backend(spec.kind, path=spec.path, n_ctx=spec.n_ctx, threads=spec.threads)
        from shards.context import ContextShard

        return ContextShard(spec.role, spec.model, backend, spec.queue_depth)
    from shards.local import LocalShard

    backend = load_backend(spec.kind, path=spec.path, n_ctx=spec.n_ctx, threads=spec.threads,
                           slots=max(1, spec.parallel))
    return LocalShard(spec.role, spec.model, backend, spec.queue_depth, spec.chat_template)


async def serve(spec: HostSpec, ready_fd: int) -> None:
    import grpc

    from shards.grpc_service import SERVER_OPTIONS, ShardService

    shard = await asyncio.to_thread(open_shard, spec)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    ShardService(lambda: {(spec.role, spec.model): shard}).add_to(server)
    if server.add_secure_port(f"unix:{spec.socket}",
                              grpc.local_server_credentials(grpc.LocalConnectionType.UDS)) == 0:
        raise SystemExit(f"cannot listen on unix:{spec.socket}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    with os.fdopen(ready_fd, "w") as ready:
        ready.write(json.dumps({"ready": True, "n_ctx": shard.n_ctx, "pid": os.getpid()}) + "\n")
    log.info("serving %s/%s on %s", spec.role, spec.model, spec.socket)
    await stop.wait()
    await server.stop(1.0)
    await asyncio.to_thread(shard.close)


def main() -> None:
    spec = HostSpec.from_json(sys.argv[1])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    die_with_parent(spec.parent)
    offer_to_oom_killer()
    # The parent reads one line on stdout: keep that pipe for it alone, and send whatever else writes to
    # stdout (a C library's printf) to stderr, which the parent logs and keeps draining.
    ready_fd = os.dup(1)
    os.dup2(2, 1)
    import faulthandler

    faulthandler.enable()  # a native crash prints the Python stack to stderr: the parent keeps the tail
    try:
        import uvloop
    except ImportError:  # optional, as in meshd: asyncio's own loop works too
        uvloop = None
    (uvloop.run if uvloop is not None else asyncio.run)(serve(spec, ready_fd))


if __name__ == "__main__":
    main()
