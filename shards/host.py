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
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass

from shards.child_process import die_with_parent, offer_to_oom_killer

log = logging.getLogger("quorum.shard-host")

STAGE_WAIT_S = 60.0  # a split head waits this long for its stages to answer before it gives up (and is retried)
STALLED_EXIT = 70  # EX_SOFTWARE: the process ended itself on a stuck decoding step (shards/stall_watch.py)


def stall_watch(spec: "HostSpec"):
    """The watch on the generator's decoding steps: a stuck step ends this process, so meshd restarts it and
    its streams resume elsewhere. QUORUM_STALL_LIMIT_S sets the bound (tests; a HostSpec carries no test knobs)."""
    from shards.stall_watch import HEAD_STEP_LIMIT_S, STEP_LIMIT_S, StallWatch

    def end(why: str) -> None:
        log.critical("%s; ending the shard process", why)
        logging.shutdown()  # the line reaches meshd before the exit
        os._exit(STALLED_EXIT)

    limit = float(os.environ.get("QUORUM_STALL_LIMIT_S", "0") or 0) or (HEAD_STEP_LIMIT_S if spec.stages
                                                                         else STEP_LIMIT_S)
    return StallWatch(end, limit_s=limit, name=f"{spec.role}/{spec.model}")


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
    # A layer-split model's head (shards/rpc_head.py): "ENDPOINT=LAYERS" per stage, in pipeline order, each a
    # loopback endpoint (meshd's tunnel to the stage's member, mesh/replicas/rpc_tunnel.py). The head decodes
    # one sequence (LlamaBackend, repacking and KV checkpoints off): `parallel` is not used. (): the whole model.
    stages: tuple[str, ...] = ()
    kv_cache_type: str = "f16"  # node.kv_cache_type: f16, or q8_0 (about half the KV cache's memory)
    batch_exact: bool = True  # node.batch_exact: batched answers equal each alone (shards/backend_llama_batch.py)

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> "HostSpec":
        raw = json.loads(text)
        if "stages" in raw:
            raw["stages"] = tuple(raw["stages"])
        return cls(**raw)


def open_shard(spec: HostSpec):
    """The backend loaded and wrapped: LocalShard for a generator, ContextShard for an encoder."""
    from shards.backend import load_backend

    if spec.kind == "onnx":
        backend = load_backend(spec.kind, path=spec.path, n_ctx=spec.n_ctx, threads=spec.threads)
        from shards.context import ContextShard

        return ContextShard(spec.role, spec.model, backend, spec.queue_depth)
    from shards.local import LocalShard

    if spec.stages:
        from shards.rpc_head import Stage, open_split_backend, wait_for_stages

        stages = [Stage.parse(text) for text in spec.stages]
        wait_for_stages(stages, STAGE_WAIT_S)  # a stage restarted with us may still be starting
        loaded = open_split_backend(spec.path, spec.n_ctx, spec.threads, stages)
        log.info("split model loaded in %.1f s; weights (MiB): %s", loaded.load_s, loaded.buffers)
        return LocalShard(spec.role, spec.model, loaded.backend, spec.queue_depth, spec.chat_template,
                          stall=stall_watch(spec))
    extra = {"kv_cache_type": spec.kv_cache_type, "batch_exact": spec.batch_exact} if spec.kind == "llama" else {}
    backend = load_backend(spec.kind, path=spec.path, n_ctx=spec.n_ctx, threads=spec.threads,
                           slots=max(1, spec.parallel), **extra)
    return LocalShard(spec.role, spec.model, backend, spec.queue_depth, spec.chat_template, stall=stall_watch(spec))


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
    # A GGML_ABORT (a split head whose stage is lost) would otherwise run gdb for a backtrace first: seconds
    # before meshd sees the exit and the stream fails over. faulthandler prints the Python stack either way.
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
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
