"""What the durable journal costs, side by side in one run: 3 RaftNodes in this process on loopback, with

- "stock": pysyncobj 0.3.17's own FileJournal (mmap, never fsynced) and TCPTransport, as before;
- "batch": raft/journal.py, fsync once per tick and before any send (what RaftNode uses);
- "add":   raft/journal.py, fsync inside every journal write.

For each: p50/p95 commit latency of one command at a time proposed on the leader, and the throughput of
session checkpoints (SessionAppend of 8 tokens, 16 sessions, up to --window proposals in flight). The data
directories go under --dir (default: a temporary directory next to this repository, so on a real disk; a
tmpfs makes fsync free and the comparison meaningless).

    .venv/bin/python -m tests.bench.bench_raft_journal [--rounds 2] [--commits 200] [--checkpoints 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import Future, wait
from pathlib import Path

from pysyncobj import SyncObj

from mesh.core.config import MeshConfig
from mesh.node.startup import raft_timing
from raft.commands import InitMesh, SessionAppend, SessionTurnStart, SetReplicas
from raft.journal import SYNC_BATCH, SYNC_EACH_ADD
from raft.node import RaftNode, _Log
from tests.procs import free_ports, wait_until

SECRET = "bench-secret-0123456789abcdef0123"


class StockRaftNode(RaftNode):
    """RaftNode on pysyncobj's own journal file and transport (the state before raft/journal.py)."""

    def _start(self, self_address, partners, data_dir, password, timing, auto_tick, on_applied) -> SyncObj:
        self.journal._destroy()  # opened (empty) by RaftNode.__init__; unused here
        conf = self._conf(data_dir, password, timing, auto_tick)
        conf.journalFile = str(data_dir / "raft.journal")
        self._log = _Log(on_applied)
        self.address = self_address
        return SyncObj(self_address, partners, conf=conf, consumers=[self._log])


def start_group(kind: str, root: Path) -> list[RaftNode]:
    timing = raft_timing(MeshConfig())
    addresses = [f"127.0.0.1:{free_ports(1)}" for _ in range(3)]
    nodes = []
    for i, a in enumerate(addresses):
        partners = [b for b in addresses if b != a]
        if kind == "stock":
            nodes.append(StockRaftNode(a, partners, root / f"raft{i}", SECRET, timing))
        else:
            nodes.append(RaftNode(a, partners, root / f"raft{i}", SECRET, timing, journal_sync=kind))
    wait_until(lambda: sum(n.is_leader() for n in nodes) == 1 and all(n.is_ready() for n in nodes), 30, "a leader")
    return nodes


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def run(kind: str, root: Path, args) -> dict:
    nodes = start_group(kind, root)
    try:
        leader = next(n for n in nodes if n.is_leader())
        leader.propose(InitMesh(mesh_id="bench", name="bench", created_at=1.0)).result(10)
        latency = []
        for i in range(args.commits):
            start = time.perf_counter()
            leader.propose(SetReplicas("reasoning", 1 + i % 3)).result(10)
            latency.append((time.perf_counter() - start) * 1000)
        sessions = [f"s{i}" for i in range(16)]
        for s in sessions:
            leader.propose(SessionTurnStart(s, 0, (("user", "hello"),), 5, time.time())).result(10)
        syncs_before = [n.journal.syncs for n in nodes] if kind != "stock" else None
        in_flight: list[Future] = []
        start = time.perf_counter()
        for i in range(args.checkpoints):
            if len(in_flight) >= args.window:
                done, pending = wait(in_flight, return_when="FIRST_COMPLETED")
                for f in done:
                    f.result()
                in_flight = list(pending)
            tokens = tuple(range(i * 8, i * 8 + 8))
            in_flight.append(leader.propose(SessionAppend(sessions[i % len(sessions)], 0, tokens, " tok" * 8)))
        for f in in_flight:
            f.result(30)
        elapsed = time.perf_counter() - start
        fsyncs = None
        if syncs_before is not None:
            fsyncs = sum(n.journal.syncs - b for n, b in zip(nodes, syncs_before)) / len(nodes)
        return {"p50": statistics.median(latency), "p95": percentile(latency, 0.95),
                "throughput": args.checkpoints / elapsed, "fsyncs_per_member": fsyncs}
    finally:
        for n in nodes:
            n.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--commits", type=int, default=200)
    ap.add_argument("--checkpoints", type=int, default=1000)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--dir", type=Path, default=Path(__file__).resolve().parents[2])
    args = ap.parse_args()
    kinds = ["stock", SYNC_BATCH, SYNC_EACH_ADD]
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix=".bench-raft-journal-", dir=args.dir) as tmp:
        print(f"data under {tmp} ({os.statvfs(tmp).f_bsize}-byte blocks)", flush=True)
        for r in range(args.rounds):
            for kind in kinds:  # alternated, so drift in the machine's load hits every kind alike
                res = run(kind, Path(tmp) / f"{kind}-{r}", args)
                results[kind].append(res)
                extra = "" if res["fsyncs_per_member"] is None else \
                    f", {res['fsyncs_per_member']:.0f} fsyncs per member for {args.checkpoints} checkpoints"
                print(f"round {r + 1} {kind:>5}: commit p50 {res['p50']:.2f} ms, p95 {res['p95']:.2f} ms; "
                      f"checkpoints {res['throughput']:.0f}/s{extra}", flush=True)
    print("\nmedian over rounds (3 members, loopback, proposed on the leader):")
    labels = {"stock": "pysyncobj FileJournal, no fsync", SYNC_BATCH: "raft.journal, fsync per tick (batch)",
              SYNC_EACH_ADD: "raft.journal, fsync per write (add)"}
    for kind in kinds:
        rs = results[kind]
        print(f"  {labels[kind]:<38} commit p50 {statistics.median(r['p50'] for r in rs):6.2f} ms  "
              f"p95 {statistics.median(r['p95'] for r in rs):6.2f} ms  "
              f"checkpoints {statistics.median(r['throughput'] for r in rs):6.0f}/s")


if __name__ == "__main__":
    main()
