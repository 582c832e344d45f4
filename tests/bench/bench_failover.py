"""Failover and session-log costs, measured in one run:

1. failover gap: a streamed answer (temperature 0) whose serving member is killed (kill -9) or
   frozen (SIGSTOP) after a few tokens; the gap is the time from the last chunk before the
   interruption to the first chunk after it (targets: kill -9 p50 <= 300 ms, SIGSTOP p50 <= 1.5 s);
   The gateway's log says where each gap went (mesh/replicas/failover.py): loss noticed, resume admitted
   on the other replica, its first (replayed) piece, its first new piece; medians are printed.
2. leader election time in a 3-member Raft group with meshd's settings, after the leader stops
   (target p50 <= 1 s), and, in the same groups, the commit latency of session-log entries: a
   checkpoint of 16 answer tokens, and a turn start carrying 1,000 prompt token ids;
3. decoding tokens/s of a streamed chat with a named session (checkpointed through Raft) vs
   without, alternated on one node (target >= 0.97).

    .venv/bin/python -m tests.bench.bench_failover [--kills 10] [--runs 6]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from mesh.core.config import MeshConfig
from mesh.node.startup import raft_timing
from raft.commands import InitMesh, SessionAppend, SessionTurnEnd, SessionTurnStart
from raft.node import RaftNode
from tests.procs import Meshd, free_ports, kill_all, ready_replicas, serves, start_mesh, wait_until

MODEL = "gemma-3-270m"
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def stream_with_interrupt(base_url: str, interrupt, after: int = 10, tokens: int = 60, prepare=None) -> float:
    """Streams an answer, calls prepare() after 3 content chunks and interrupt() after `after`;
    returns the gap in seconds: the longest pause between two chunks after the interruption
    (chunks already on their way when it happened arrive without a pause, so the first one after
    it would understate the gap)."""
    stamps: list[float] = []
    cut = None
    tail: list[str] = []
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", timeout=120,
                      json={"model": MODEL, "messages": PROMPT, "max_tokens": tokens, "temperature": 0,
                            "stream": True}) as reply:
        for line in reply.iter_lines():
            tail = (tail + [line])[-3:]
            if '"content":"' not in line or '"content":""' in line:
                continue
            stamps.append(time.perf_counter())
            if len(stamps) == 3 and prepare is not None:
                prepare()
            if len(stamps) == after:
                cut = len(stamps) - 1
                interrupt()
    if cut is None or len(stamps) <= cut + 1:
        raise RuntimeError(f"the stream did not continue after the interruption; it ended with {tail}")
    return max(b - a for a, b in zip(stamps[cut:], stamps[cut + 1:]))


RESUMED = re.compile(r"(\d+) tokens replayed: first new piece (\d+) ms after the last one \(loss noticed at (\d+) ms, "
                     r"admitted at (\d+), first replayed piece at (\w+)\)(?:; sent a KV checkpoint of (\d+) tokens)?")


def resume_lines(node: Meshd) -> list[tuple[float, ...]]:
    """(resent tokens, first new piece, noticed, admitted, first replayed piece, tokens the KV checkpoint
    sent with it covers: 0 for none) of each resume the node logged."""
    return [tuple(float(x or 0) for x in m.groups()) for m in RESUMED.finditer(node.log())]


def breakdown(rows: list[tuple[float, ...]]) -> str:
    med = {k: statistics.median(r[i] for r in rows) for i, k in enumerate(("replayed", "gap", "noticed", "admitted",
                                                                            "first"))}
    return (f"median {med['noticed']:.0f} ms to notice the loss, +{med['admitted'] - med['noticed']:.0f} ms to admit "
            f"the resume, +{med['first'] - med['admitted']:.0f} ms to its first piece (prompt prefill, first "
            f"replayed token; or KV restore), +{med['gap'] - med['first']:.0f} ms to the first new piece (the rest "
            f"of {med['replayed']:.0f} resent tokens, one new); {med['gap']:.0f} ms in all at the gateway; "
            f"{sum(1 for r in rows if r[5])} of {len(rows)} resumes sent a KV checkpoint")


def leader_name(nodes: dict[str, Meshd]) -> str:
    """The member that leads now, as the members see it."""
    def find() -> str | None:
        for node in nodes.values():
            try:
                members = node.status()["members"]
            except httpx.HTTPError:
                continue  # a member restarting: ask the next one
            name = next((m["name"] for m in members if m.get("leader")), None)
            if name:
                return name
        return None
    return wait_until(find, 30, "a leader")


def restart(nodes: dict[str, Meshd], name: str) -> None:
    """Kills `name` (-9) if it still runs, starts it again, and waits until b and c serve."""
    nodes[name].kill()
    old = nodes[name]
    nodes[name] = Meshd(old.data_dir, command="start", port=old.port, name=name).start()
    wait_until(lambda: ready_replicas(nodes["a"]) == ["b", "c"] and serves(nodes[name]), 180, "recovery")


def lead_from_a(nodes: dict[str, Meshd]) -> None:
    """Makes a (which holds no replica) the leader, so the stream's gateway is never the replica
    interrupted. A restarted member often takes the lead (pysyncobj has no pre-vote: its election
    deposes the leader); restarting the leader moves it on."""
    for _ in range(12):
        name = leader_name(nodes)
        if name == "a":
            return
        restart(nodes, name)
    raise RuntimeError("a did not become the leader after 12 restarts of the others")


def bench_gap(args, root: Path) -> None:
    """Streams through a, the leader, and interrupts the replica (b or c) serving the stream."""
    nodes = start_mesh(root, ["a", "b", "c"], replicas_on=["b", "c"])
    a = nodes["a"]
    try:
        for how, sig in (("kill -9", signal.SIGKILL), ("SIGSTOP", signal.SIGSTOP)):
            gaps, rows = [], []
            for _ in range(args.kills):
                lead_from_a(nodes)
                logged_before = len(resume_lines(a))
                victim = []

                def find_victim() -> None:  # early, so the signal goes out as soon as chunk `after` arrives
                    victim.append(next(n for n in ("b", "c")
                                       if any(s["busy"] for s in nodes[n].status()["local_shards"])))

                def interrupt() -> None:
                    os.kill(nodes[victim[0]].proc.pid, sig)

                gaps.append(stream_with_interrupt(a.base_url, interrupt, prepare=find_victim))
                rows += resume_lines(a)[logged_before:]
                if sig == signal.SIGSTOP:
                    os.kill(nodes[victim[0]].proc.pid, signal.SIGCONT)
                restart(nodes, victim[0])
            gaps_ms = [g * 1000 for g in gaps]
            print(f"failover gap after {how}: p50 {statistics.median(gaps_ms):.0f} ms, p95 {pct(gaps_ms, 0.95):.0f} ms "
                  f"over {len(gaps_ms)} interruptions", flush=True)
            if rows:
                print(f"  where it went ({len(rows)} resumes logged): {breakdown(rows)}", flush=True)
    finally:
        kill_all(nodes)


def commit_latencies(leader: RaftNode, round_: int, count: int = 20) -> tuple[list[float], list[float]]:
    """Milliseconds to commit session-log entries through `leader`: (16-token checkpoints, turn
    starts carrying 1,000 prompt token ids), one at a time."""
    def commit(cmd) -> float:
        start = time.perf_counter()
        leader.propose(cmd).result(timeout=30)
        return (time.perf_counter() - start) * 1000

    commit(InitMesh(f"bench-{round_}", "bench", time.time()))
    ids = tuple(range(100_000, 101_000))
    starts, appends = [], []
    for turn in range(count):
        starts.append(commit(SessionTurnStart("s", turn, (("user", "hello"),), len(ids), time.time(), ids)))
        appends.append(commit(SessionAppend("s", turn, tuple(range(200_000, 200_016)), "sixteen tokens")))
        leader.propose(SessionTurnEnd("s", turn, "length", time.time())).result(timeout=30)
    return appends, starts


def bench_election(args, root: Path) -> None:
    timing = raft_timing(MeshConfig())
    times, appends, starts = [], [], []
    for round_ in range(args.kills):
        addresses = [f"127.0.0.1:{free_ports(1)}" for _ in range(3)]
        secret = "bench-secret-0123456789abcdef01"
        nodes = [RaftNode(x, [y for y in addresses if y != x], root / f"e{round_}-{i}", secret,
                          timing) for i, x in enumerate(addresses)]
        try:
            wait_until(lambda: sum(n.is_leader() for n in nodes) == 1 and all(n.is_ready() for n in nodes), 30,
                       "a leader")
            leader = next(n for n in nodes if n.is_leader())
            rest = [n for n in nodes if n is not leader]
            more_appends, more_starts = commit_latencies(leader, round_)
            appends += more_appends
            starts += more_starts
            start = time.perf_counter()
            leader.close()
            wait_until(lambda: any(n.is_leader() for n in rest), 30, "a new leader", every=0.005)
            times.append((time.perf_counter() - start) * 1000)
        finally:
            for n in nodes:
                n.close()
    print(f"leader election after the leader stops: p50 {statistics.median(times):.0f} ms, "
          f"p95 {pct(times, 0.95):.0f} ms over {len(times)} rounds", flush=True)
    print(f"session log commit on 3 members: checkpoint of 16 tokens p50 {statistics.median(appends):.1f} ms, "
          f"p95 {pct(appends, 0.95):.1f} ms; turn start with 1,000 prompt ids p50 {statistics.median(starts):.1f} ms, "
          f"p95 {pct(starts, 0.95):.1f} ms ({len(appends)} of each)", flush=True)


def bench_session_logging(args, root: Path) -> None:
    with Meshd(root / "solo") as node:
        node.wait_ready()

        def rate(session: str | None) -> float:
            headers = {"X-Session-Id": session} if session else {}
            first = last = None
            count = 0
            with httpx.stream("POST", f"{node.base_url}/v1/chat/completions", timeout=120, headers=headers,
                              json={"model": MODEL, "messages": PROMPT, "max_tokens": 128, "temperature": 0,
                                    "stream": True}) as reply:
                for line in reply.iter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        count += 1
            return (count - 1) / (last - first)

        rate(None)
        ratios = []
        for i in range(args.runs):
            on, off = rate(f"bench-{i}"), rate(None)
            ratios.append(on / off)
            print(f"run {i + 1}: with session log {on:.1f} tok/s, without {off:.1f} tok/s", flush=True)
    print(f"tokens/s with session logging / without: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}; target >= 0.97)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--only", nargs="+", default=["election", "sessions", "gap"],
                    choices=["election", "sessions", "gap"])
    ap.add_argument("--dir", default=None, help="keep the run's data dirs and logs under this folder")
    args = ap.parse_args()
    with (contextlib.nullcontext(tempfile.mkdtemp(dir=args.dir)) if args.dir
          else tempfile.TemporaryDirectory()) as tmp:
        if "election" in args.only:
            bench_election(args, Path(tmp))
        if "sessions" in args.only:
            bench_session_logging(args, Path(tmp))
        if "gap" in args.only:
            bench_gap(args, Path(tmp))


if __name__ == "__main__":
    main()
