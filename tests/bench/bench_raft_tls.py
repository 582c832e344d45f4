"""What mutual TLS on the Raft port costs, side by side in one run: 3 RaftNodes in this process on loopback,
built as meshd builds a mesh (tests/unit/raft_tls_mesh.py), with

- "fernet": pysyncobj's password encryption (Fernet, a key derived from the mesh secret), as before;
- "tls":    raft/tls.py, mutual TLS 1.3 with member certificates, Fernet off (what meshd runs).

For each: p50/p95 commit latency of one command at a time proposed on the leader, the Raft bytes each
member sends per second while idle (heartbeats only; TLS records and Fernet tokens included, TCP/IP headers
not), and the time from the leader stopping to another member leading (pre-vote on, meshd's timings).
Rounds alternate the two so that drift on a shared machine hits both.

    .venv/bin/python -m tests.bench.bench_raft_tls [--rounds 2] [--commits 300] [--idle-s 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from mesh.core.config import MeshConfig
from mesh.node.startup import raft_timing
from raft.bounded_connection import BoundedConnection
from raft.commands import SetReplicas
from tests.unit import raft_tls_mesh
from tests.unit.raft_tls_mesh import Authority, addresses, build_mesh, close_all, leader_of

SECRET = "bench-secret-0123456789abcdef0123"
_sent: dict[int, int] = defaultdict(int)  # id(poller) (one per member) -> bytes handed to the socket


def _count_sends() -> None:
    original = BoundedConnection._try_send

    def counting(self) -> None:
        before = len(self._wbuf)
        original(self)
        if self._sock is not None:
            _sent[id(self._poller)] += before - len(self._wbuf)
    BoundedConnection._try_send = counting


def run(kind: str, root: Path, commits: int, idle_s: float) -> tuple[list[float], list[float], float]:
    nodes = build_mesh(root, Authority(), ["a", "b", "c"], addresses(3), password=SECRET, tls=kind == "tls")
    try:
        leader = leader_of(nodes)
        latencies = []
        for i in range(commits):
            started = time.perf_counter()
            leader.propose(SetReplicas("reasoning", i % 7)).result(timeout=10)
            latencies.append((time.perf_counter() - started) * 1000)
        pollers = {id(n._obj._poller) for n in nodes.values()}
        before = {p: _sent[p] for p in pollers}
        time.sleep(idle_s)  # a benchmark: the idle window is the measurement
        rates = sorted((_sent[p] - before[p]) / idle_s for p in pollers)
        # Election time: the leader stops (as a killed process would: its sockets close), until one of
        # the others leads with a majority.
        rest = {k: n for k, n in nodes.items() if n is not leader}
        stopped = time.perf_counter()
        leader.close()
        deadline = stopped + 30
        while not any(n.is_leader() for n in rest.values()) and time.perf_counter() < deadline:
            time.sleep(0.005)  # a benchmark: polling the election, bounded by the deadline
        election = time.perf_counter() - stopped
        return latencies, rates, election
    finally:
        close_all(nodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--commits", type=int, default=300)
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parents[2] / ".bench-tmp")
    args = parser.parse_args()
    raft_tls_mesh.TIMING = raft_timing(MeshConfig())  # meshd's defaults: heartbeat 50 ms, election 300-600 ms
    _count_sends()
    args.dir.mkdir(exist_ok=True)
    results: dict[str, tuple[list[float], list[float], list[float]]] = {k: ([], [], []) for k in ("fernet", "tls")}
    for _ in range(args.rounds):
        for kind in results:
            print(f"-- {kind}", flush=True)
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                lat, rates, election = run(kind, Path(tmp), args.commits, args.idle_s)
            results[kind][0].extend(lat)
            results[kind][1].extend(rates)
            results[kind][2].append(election)
    print(f"{'':8} {'p50 ms':>8} {'p95 ms':>8} {'idle B/s per member (min / median / max)':>44} "
          f"{'election after the leader stops, s (median / max)':>50}")
    for kind, (lat, rates, elections) in results.items():
        q = statistics.quantiles(lat, n=20)
        print(f"{kind:8} {statistics.median(lat):8.2f} {q[18]:8.2f} "
              f"{min(rates):14.0f} / {statistics.median(rates):6.0f} / {max(rates):6.0f} "
              f"{statistics.median(elections):38.2f} / {max(elections):.2f}")
    f, t = (statistics.median(results[k][0]) for k in ("fernet", "tls"))
    print(f"tls/fernet p50 ratio: {t / f:.2f}")


if __name__ == "__main__":
    main()
