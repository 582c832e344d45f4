"""Role shards side by side, through one real meshd and the openai SDK:

- tool-use: the same prompt answered as a forced tool call (grammar-constrained) and as plain chat,
  alternated run by run; prints time to the finished answer, tokens/s of each, and their ratios;
- context: embeddings per second through /v1/embeddings, one text per call and in batches of 32.

Run:

    .venv/bin/python -m tests.bench.bench_roles [--runs 8] [--tokens 48] [--embed-seconds 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import openai

from tests.procs import Meshd

MODEL = "gemma-3-270m"
ENCODER = "all-minilm-l6-v2"
PROMPT = [{"role": "user", "content": "What is the weather in Paris today, in celsius?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}]
SENTENCES = [f"Sentence number {i} talks about lighthouses, storms and the sea near harbour {i % 7}."
             for i in range(64)]


def timed_chat(client: openai.OpenAI, tokens: int, tools: bool) -> tuple[float, int]:
    """(seconds to the whole answer, completion tokens)."""
    extra = {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}} if tools else {}
    start = time.perf_counter()
    reply = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=tokens, temperature=0, **extra)
    elapsed = time.perf_counter() - start
    if tools:
        assert reply.choices[0].message.tool_calls, "the forced call produced no tool_calls"
    return elapsed, reply.usage.completion_tokens


def embeddings_per_second(client: openai.OpenAI, batch: int, seconds: float) -> float:
    done, start = 0, time.perf_counter()
    i = 0
    while time.perf_counter() - start < seconds:
        texts = [SENTENCES[(i + k) % len(SENTENCES)] for k in range(batch)]
        reply = client.embeddings.create(model=ENCODER, input=texts if batch > 1 else texts[0])
        done += len(reply.data)
        i += batch
    return done / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--embed-seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "node"
        data_dir.mkdir()
        (data_dir / "mesh.toml").write_text("[replicas]\nreasoning = 1\ncontext = 1\n")
        with Meshd(data_dir, threads=args.threads) as node:
            node.wait_ready(300)
            client = openai.OpenAI(base_url=f"{node.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
            timed_chat(client, args.tokens, False), timed_chat(client, args.tokens, True)  # warm both paths
            plain, tool = [], []
            for _ in range(args.runs):
                plain.append(timed_chat(client, args.tokens, False))
                tool.append(timed_chat(client, args.tokens, True))
            p_s = statistics.median(t for t, _ in plain)
            t_s = statistics.median(t for t, _ in tool)
            p_tps = statistics.median(n / t for t, n in plain)
            t_tps = statistics.median(n / t for t, n in tool)
            print(f"plain chat   : median {p_s * 1000:7.1f} ms per answer, {p_tps:6.1f} tokens/s "
                  f"({statistics.median(n for _, n in plain)} tokens)")
            print(f"tool call    : median {t_s * 1000:7.1f} ms per answer, {t_tps:6.1f} tokens/s "
                  f"({statistics.median(n for _, n in tool)} tokens)")
            print(f"ratio        : tool-call latency / plain = {t_s / p_s:.2f}; tokens/s tool / plain = "
                  f"{t_tps / p_tps:.2f}")
            single = embeddings_per_second(client, 1, args.embed_seconds)
            batched = embeddings_per_second(client, 32, args.embed_seconds)
            print(f"embeddings/s : {single:7.1f} one text per call, {batched:7.1f} in batches of 32")


if __name__ == "__main__":
    main()
