"""Footprints of a witness and of a model node, and what an idle mesh costs, measured in one run:

1. start to ready: `meshd start` of a single-node mesh whose model file is already in its data dir
   (a first, untimed run assembled it) until /health answers 200, which needs the node's own
   reasoning shard loaded. Median of --starts runs; the last one stays up as the first member of:
2. an idle 5-member mesh: that node (model node, leader), a second model node, and three witnesses
   running on the base install only (grpc, numpy, llama_cpp, onnxruntime refused at import, see
   tests/base_install.py). Once every member is ready and the replicas are loaded, one window of
   --idle-s seconds with no requests measures:
   - witness RSS (psutil) when ready and at the end of the window;
   - model node overhead: RSS of meshd and of its shard processes (each model shard runs in a child
     process, shards/host.py) minus the resident part of the GGUF file mapping. llama.cpp mmaps the
     weights read-only from the file; psutil's memory_maps() gives each mapping's resident bytes, and
     those of the mapping whose path ends in .gguf are subtracted (what stays is Python, llama.cpp's
     KV cache and compute buffers, gRPC, the gateway). Each process is shown on its own line too.
     RSS counts a shared page (libpython, numpy, gRPC, mapped by meshd and by each shard process) once
     in every process, so the same sum of PSS (each shared page split between the processes mapping it)
     minus the GGUF's PSS is shown beside it: what the node costs the machine. The target is judged on
     the RSS figure, the stricter one (the issue's own measure). A context shard's sentence encoder is
     read into memory by onnxruntime, not mapped: its file size is shown on a line of its own;
   - idle CPU: the process's user+system CPU seconds over the window / the window (100% = one core);
   - Raft traffic: TCP payload bytes on every connection to or from a member's Raft port, from the
     kernel's per-socket counters (`ss -tin`: bytes_received at each end, so every byte counts once,
     at the end that received it), delta over the window, divided by the members. TCP/IP headers
     (52 bytes a segment on loopback, with timestamps) are shown separately. The same for all
     inter-member ports (Raft, gRPC, HTTPS peer port, HTTP) for completeness.

    .venv/bin/python -m tests.bench.bench_footprint [--idle-s 60] [--starts 3] [--parallel N] [--kv-cache-type q8_0]

--parallel and --kv-cache-type go to the model nodes' mesh.toml ([node] parallel, kv_cache_type); without them
the model nodes run the defaults (parallel by the machine's memory). Memory per slot: two runs, --parallel 1 and
the default, side by side (or the shard process's lines, which name the slots).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.base_install import base_install, heavy_attempts, mapped_heavy_libraries, witness
from tests.procs import Meshd, join_token, kill_all, ready_replicas, wait_until

MB = 1_000_000
HEADER_BYTES = 52  # IPv4 20 + TCP 20 + timestamps option 12, per segment on loopback
WITNESSES = ("w1", "w2", "w3")
# w1 keeps the default configuration (it announces itself by mDNS, loading zeroconf); w2 and w3 set
# `[discovery] advertise = false` as deploy/openwrt/INSTALL.md suggests for routers; w3 is then
# restarted (`meshd start`), the state a router is in after its first reboot.
QUIET = "[discovery]\nadvertise = false\n"
SETUP = {"w1": "joined, default config (mDNS on)", "w2": "joined, mDNS off", "w3": "restarted, mDNS off"}
MODEL_NODES = ("a", "b")


@dataclass
class Row:
    figure: str
    value: float
    unit: str
    target: float | None

    def line(self) -> str:
        verdict = "" if self.target is None else ("ok" if self.value <= self.target else "OVER")
        target = "" if self.target is None else f"<= {self.target:g} {self.unit}"
        return f"{self.figure:<58} {self.value:>10.2f} {self.unit:<5} {target:<14} {verdict}"


def start_to_ready(node: Meshd, starts: int) -> list[float]:
    """Seconds from launching `meshd start` to /health 200, `starts` times (the node stays up)."""
    times = []
    for i in range(starts):
        began = time.monotonic()
        node.start()
        wait_until(lambda: _alive(node) and node.health() == 200, 120, "the node to be ready", every=0.02)
        times.append(time.monotonic() - began)
        if i < starts - 1:
            node.interrupt()
    return times


def _alive(node: Meshd) -> bool:
    if node.proc.poll() is not None:
        raise RuntimeError(f"meshd exited with {node.proc.returncode}:\n{node.log()[-3000:]}")
    return True


def resident_by_kind(pid: int) -> dict[str, int]:
    """Resident bytes of the process's mappings: the GGUF file, shared libraries, anonymous memory
    (heap, Python objects, llama.cpp's KV cache and buffers, thread stacks) and other files; and the
    PSS of the GGUF mapping ("gguf pss") and of the whole process ("pss")."""
    kinds = {"gguf": 0, "libraries": 0, "anonymous": 0, "other files": 0, "gguf pss": 0, "pss": 0}
    for m in psutil.Process(pid).memory_maps(grouped=True):
        kinds["pss"] += m.pss
        if m.path.endswith(".gguf"):
            kinds["gguf"] += m.rss
            kinds["gguf pss"] += m.pss
        elif ".so" in m.path.rpartition("/")[2]:
            kinds["libraries"] += m.rss
        elif not m.path.startswith("/"):
            kinds["anonymous"] += m.rss
        else:
            kinds["other files"] += m.rss
    return kinds


def node_memory(pid: int) -> list[tuple[str, int, dict[str, int]]]:
    """(label, RSS, resident_by_kind) of meshd and of each of its shard processes."""
    daemon = psutil.Process(pid)
    out = [("meshd", daemon.memory_info().rss, resident_by_kind(pid))]
    for child in daemon.children(recursive=True):
        try:
            spec = host_spec(child)
            label = f"shard process {spec.get('role', '?')}"
            if spec.get("kind") == "llama" and not spec.get("stages"):
                label += f" ({max(1, spec.get('parallel', 1))} slots, {spec.get('kv_cache_type', 'f16')} KV)"
            out.append((label, child.memory_info().rss, resident_by_kind(child.pid)))
        except psutil.Error:  # a child that ended between the listing and the read: not counted
            continue
    return out


def host_spec(child: psutil.Process) -> dict:
    """The HostSpec JSON a shard process was started with (shards/host.py), {} for another child."""
    for arg in child.cmdline():
        if arg.startswith("{") and '"role"' in arg:
            return json.loads(arg)
    return {}


def encoder_file_bytes(pid: int) -> int:
    """Size of the .onnx files the node's shard processes serve (read into memory, not mapped)."""
    total = 0
    for child in psutil.Process(pid).children(recursive=True):
        try:
            path = host_spec(child).get("path", "")
        except psutil.Error:  # ended since the listing: not counted
            continue
        if path.endswith(".onnx") and Path(path).exists():
            total += Path(path).stat().st_size
    return total


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def tcp_counters(ports: set[int]) -> dict[tuple[str, str], tuple[int, int]]:
    """{(local, peer): (bytes_received, segs_in)} of established loopback TCP sockets with one end
    on `ports` (host:port strings as `ss` prints them)."""
    out = subprocess.run(["ss", "-tinH", "state", "established"], capture_output=True, text=True, check=True).stdout
    counters, key = {}, None
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            fields = line.split()
            local, peer = fields[-2], fields[-1]
            ends = {int(local.rpartition(":")[2]), int(peer.rpartition(":")[2])}
            loopback = all(e.startswith(("127.", "[::1]")) for e in (local, peer))
            key = (local, peer) if loopback and ends & ports else None
            continue
        if key is not None:
            received = re.search(r"\bbytes_received:(\d+)", line)
            segs = re.search(r"\bsegs_in:(\d+)", line)
            counters[key] = (int(received.group(1)) if received else 0, int(segs.group(1)) if segs else 0)
            key = None
    return counters


def traffic(before: dict, after: dict, ports: set[int]) -> tuple[int, int, int]:
    """(payload bytes, segments, sockets that were not there all along) between two snapshots, on
    the sockets with one end on `ports`."""
    def on(key: tuple[str, str]) -> bool:
        return bool({int(key[0].rpartition(":")[2]), int(key[1].rpartition(":")[2])} & ports)
    before = {k: v for k, v in before.items() if on(k)}
    after = {k: v for k, v in after.items() if on(k)}
    payload = segments = churn = 0
    for key, (received, segs) in after.items():
        old = before.get(key)
        if old is None:
            churn += 1
            old = (0, 0)
        payload += received - old[0]
        segments += segs - old[1]
    churn += len(set(before) - set(after))
    return payload, segments, churn


def ports_of(status: dict) -> tuple[set[int], set[int]]:
    """(Raft ports, every member port) of the mesh's members."""
    raft, every = set(), set()
    for m in status["members"]:
        raft.add(int(m["raft_address"].rpartition(":")[2]))
        for field in ("raft_address", "grpc_address", "http_address", "peer_address"):
            if m.get(field):
                every.add(int(m[field].rpartition(":")[2]))
    return raft, every


def model_config(args) -> str:
    """The model nodes' mesh.toml: the [node] settings given on the command line."""
    lines = [f"parallel = {args.parallel}"] if args.parallel is not None else []
    lines += [f'kv_cache_type = "{args.kv_cache_type}"'] if args.kv_cache_type else []
    return "[node]\n" + "\n".join(lines) + "\n" if lines else ""


def build_mesh(root: Path, args) -> tuple[dict[str, Meshd], list[float]]:
    starts, config = args.starts, model_config(args)
    for name in MODEL_NODES:
        if config:
            (root / name).mkdir(parents=True)
            (root / name / "mesh.toml").write_text(config)
    a = Meshd(root / "a", command="start")
    a.init()
    nodes = {"a": a}
    try:
        a.start().wait_ready(300)  # first run: assembles the model file into the data dir (untimed)
        a.interrupt()
        times = start_to_ready(a, starts)
        nodes["b"] = Meshd(root / "b", "--peer", a.address, "--token", join_token(a), command="join").start()
        for name in WITNESSES:
            if name != "w1":
                (root / name).mkdir(parents=True)
                (root / name / "mesh.toml").write_text(QUIET)
            nodes[name] = witness(root / name, peer=a.address, token=join_token(a)).start()
        for name, node in nodes.items():
            wait_until(lambda n=node: _alive(n) and n.health() == 200, 180, f"{name} to join")
        nodes["w3"].interrupt()
        nodes["w3"] = base_install(Meshd(root / "w3", command="start", port=nodes["w3"].port)).start()
        wait_until(lambda: _alive(nodes["w3"]) and nodes["w3"].health() == 200, 180, "w3 to restart")
        a.post("/control/v1/replicas", {"role": "reasoning", "count": 2}).raise_for_status()
        for name in MODEL_NODES:
            a.post("/control/v1/assign", {"role": "reasoning", "node": name}).raise_for_status()
        wait_until(lambda: ready_replicas(a) == list(MODEL_NODES), 180, "replicas on both model nodes")
        wait_until(lambda: sum(len(n.status()["members"]) == 5 for n in nodes.values()) == 5, 60,
                   "every member to know all five")
    except BaseException:
        kill_all(nodes)
        raise
    return nodes, times


def measure(args, root: Path) -> list[Row]:
    nodes, times = build_mesh(root, args)
    try:
        pids = {name: n.proc.pid for name, n in nodes.items()}
        for name in WITNESSES:
            heavy = mapped_heavy_libraries(pids[name]) + heavy_attempts(nodes[name])
            assert not heavy, f"witness {name} loaded or tried {heavy}"
        rss_ready = {name: psutil.Process(pids[name]).memory_info().rss for name in WITNESSES}
        status = nodes["a"].status()
        raft_ports, all_ports = ports_of(status)
        ids = {m["name"]: m["node_id"] for m in status["members"]}
        roles = {name: sorted(s["role"] for s in status["shards"] if s["node_id"] == ids[name]) for name in MODEL_NODES}
        sockets0 = tcp_counters(all_ports)
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        began = time.monotonic()
        print(f"mesh ready; idle window of {args.idle_s:g} s ...", flush=True)
        wait_until(lambda: time.monotonic() - began >= args.idle_s or not all(_alive(n) for n in nodes.values()),
                   args.idle_s + 5, "the idle window", every=0.5)
        window = time.monotonic() - began
        cpu = {name: (cpu_seconds(pid) - cpu0[name]) / window * 100 for name, pid in pids.items()}
        sockets1 = tcp_counters(all_ports)
        raft_payload, raft_segments, raft_churn = traffic(sockets0, sockets1, raft_ports)
        all_payload, all_segments, all_churn = traffic(sockets0, sockets1, all_ports)
        rss_idle = {name: psutil.Process(pids[name]).memory_full_info() for name in WITNESSES}
        model = {name: node_memory(pids[name]) for name in MODEL_NODES}
        encoders = {name: encoder_file_bytes(pids[name]) for name in MODEL_NODES}
    finally:
        kill_all(nodes)

    members = len(nodes)
    rows = [Row(f"start to ready, `meshd start` (median of {len(times)}: "
                f"{', '.join(f'{t:.2f}' for t in times)})", statistics.median(times), "s", 5)]
    for name in WITNESSES:
        rows.append(Row(f"witness {name} RSS when ready ({SETUP[name]})", rss_ready[name] / MB, "MB", 50))
        rows.append(Row(f"witness {name} RSS after {window:.0f} s idle", rss_idle[name].rss / MB, "MB", 50))
        rows.append(Row(f"  witness {name} USS after {window:.0f} s idle (not shared)", rss_idle[name].uss / MB, "MB",
                        None))
        rows.append(Row(f"  witness {name} PSS after {window:.0f} s idle", rss_idle[name].pss / MB, "MB", None))
    for name in MODEL_NODES:
        procs = model[name]
        rss = sum(r for _, r, _ in procs)
        kinds = {k: sum(kk[k] for _, _, kk in procs) for k in procs[0][2]}
        rows.append(Row(f"model node {name} ({'+'.join(roles[name])}) RSS - resident GGUF, {len(procs)} processes",
                        (rss - kinds["gguf"]) / MB, "MB", 150))
        rows.append(Row(f"model node {name} PSS - GGUF's PSS (shared pages split), same processes",
                        (kinds["pss"] - kinds["gguf pss"]) / MB, "MB", 150))
        for label, r, kk in procs:
            rows.append(Row(f"  model node {name}: {label} RSS - resident GGUF", (r - kk["gguf"]) / MB, "MB", None))
            rows.append(Row(f"  model node {name}: {label} PSS - GGUF's PSS", (kk["pss"] - kk["gguf pss"]) / MB,
                            "MB", None))
        for kind, size in kinds.items():
            if kind not in ("pss", "gguf pss"):
                rows.append(Row(f"  model node {name}: {kind}", size / MB, "MB", None))
        if encoders[name]:
            rows.append(Row(f"  model node {name}: of which the sentence encoder's file (read in, not mapped)",
                            encoders[name] / MB, "MB", None))
    for name in nodes:
        kind = "witness" if name in WITNESSES else "model node"
        rows.append(Row(f"idle CPU, {kind} {name} (% of one core)", cpu[name], "%", None))
    rows.append(Row(f"Raft traffic per member, TCP payload ({members} members)", raft_payload / window / members / 1000,
                    "KB/s", 10))
    rows.append(Row("Raft traffic per member, payload + TCP/IP headers",
                    (raft_payload + raft_segments * HEADER_BYTES) / window / members / 1000, "KB/s", 10))
    rows.append(Row("all inter-member traffic per member (any port), payload + headers",
                    (all_payload + all_segments * HEADER_BYTES) / window / members / 1000, "KB/s", None))
    if raft_churn or all_churn:
        print(f"note: {raft_churn} Raft / {all_churn} other connections opened or closed during the window; "
              "bytes of a connection closed before its end are not counted")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle-s", type=float, default=60.0, help="length of the idle window (seconds)")
    ap.add_argument("--starts", type=int, default=3, help="timed `meshd start` runs")
    ap.add_argument("--parallel", type=int, default=None, metavar="N",
                    help="the model nodes' node.parallel (slots per reasoning shard; default: by memory)")
    ap.add_argument("--kv-cache-type", choices=("f16", "q8_0"), default=None,
                    help="the model nodes' node.kv_cache_type (default: the built-in one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="quorum-footprint-") as tmp:
        rows = measure(args, Path(tmp))
    print(f"\n{'figure':<58} {'measured':>10} {'unit':<5} {'target':<14}")
    for row in rows:
        print(row.line())


if __name__ == "__main__":
    main()
