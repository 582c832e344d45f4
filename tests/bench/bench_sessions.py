"""Time to first token of turn 1, 5, 10 and 20 of a named session (X-Session-Id) through meshd with the real
default model, with prefix reuse and without it, side by side in one run.

  reuse     the session alone: each turn goes back to the replica (and its slot) that served the previous
            one, which kept that turn's prompt in its KV cache; only the new part is prefilled.
  evicted   the same conversation in a second session, but before each measured turn `--parallel`
            unrelated requests run at once and take every slot of the shard, so nothing of the session is
            cached: that turn prefills its whole history (what every turn cost before prefix reuse).

Each turn: a ~40-token user message, a greedy streamed answer of --answer tokens. Prints per measured turn the
prompt tokens, the tokens reused (usage.prompt_tokens_details.cached_tokens) and the time to first token of both
runs, and their ratio. The target: TTFT of turn N stops growing with N. Run:

    .venv/bin/python -m tests.bench.bench_sessions [--turns 20] [--measure 1,5,10,20] [--answer 24] [--parallel 4]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import tempfile
import time
from pathlib import Path

import openai

from tests.procs import Meshd

MODEL = "gemma-3-270m"
TOPICS = ["the garden", "a bicycle trip", "baking bread", "the violin", "a train journey", "green tea",
          "the old lighthouse", "a fishing boat", "the winter market", "a mountain hut"]


def question(turn: int) -> str:
    topic = TOPICS[turn % len(TOPICS)]
    return (f"Turn {turn}. Tell me one short fact about {topic}, and keep in mind what we said about "
            f"{TOPICS[(turn + 3) % len(TOPICS)]} earlier, because I will ask about both of them again later.")


def turn(client: openai.OpenAI, session: str, n: int, answer: int) -> tuple[float, int, int]:
    """(time to first token, prompt tokens, cached tokens) of one streamed turn."""
    started = time.perf_counter()
    first = None
    usage = None
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question(n)}], max_tokens=answer, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_headers={"X-Session-Id": session})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            usage = chunk.usage
    details = getattr(usage, "prompt_tokens_details", None)
    cached = (details.cached_tokens or 0) if details is not None else 0
    return first if first is not None else float("nan"), usage.prompt_tokens, cached


def evict(client: openai.OpenAI, parallel: int) -> None:
    """`parallel` unrelated requests at once: every slot of the shard holds something else afterwards."""
    def one(i: int) -> None:
        client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=[
            {"role": "user", "content": f"Filler {i}: count from {i} to {i + 50}, one number a word, please. " * 4}])
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, range(parallel)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--answer", type=int, default=24)
    ap.add_argument("--threads", type=int, default=0, help="meshd's threads (0: its default)")
    ap.add_argument("--parallel", type=int, default=4, help="node.parallel of the shard (its slots)")
    ap.add_argument("--measure", default="1,5,10,20", help="the turns whose time to first token is printed")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "node"
        data_dir.mkdir()
        (data_dir / "mesh.toml").write_text(f"[node]\nparallel = {args.parallel}\n")
        with Meshd(data_dir, threads=args.threads) as node:
            node.wait_ready(300)
            client = openai.OpenAI(base_url=f"{node.base_url}/v1", api_key="x", max_retries=0, timeout=300)
            evict(client, args.parallel)  # warm up
            measured = {int(t) for t in args.measure.split(",")}
            print(f"named session, {args.turns} turns, {args.answer}-token answers, node.parallel {args.parallel}, "
                  f"threads {args.threads or 'default'}")
            print(f"{'turn':>4} {'prompt':>7} {'reused':>7} {'TTFT reuse':>11} {'TTFT evicted':>13} "
                  f"{'evicted/reuse':>14}", flush=True)
            for n in range(1, args.turns + 1):
                t_reuse, prompt, cached = turn(client, "bench-reuse", n, args.answer)
                if n not in measured:  # the other session's history still grows, with its cache kept
                    turn(client, "bench-evicted", n, args.answer)
                    continue
                evict(client, args.parallel)
                t_cold, _, cached_cold = turn(client, "bench-evicted", n, args.answer)
                print(f"{n:>4} {prompt:>7} {cached:>7} {t_reuse * 1000:>9.0f}ms {t_cold * 1000:>11.0f}ms "
                      f"{t_cold / t_reuse:>14.2f}" + (f"  (evicted run reused {cached_cold})" if cached_cold else ""),
                      flush=True)


if __name__ == "__main__":
    main()
