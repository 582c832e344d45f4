"""A witness's steady state holds no cryptography (issue 15: a witness on a 256 MB router; importing it costs
11.7 MB resident). A model node a (the null backend: no weights) and a witness w on the base install
(tests/base_install.py) with mDNS off: once joined (its key made by a child process, mesh/security/keygen.py), and
again once restarted as a router is after its first reboot, caught up, announced, its certificate checked for
renewal and its CAs (mesh/security/ca_rotation.py), holding Raft connections and serving a member's request on its
peer port, it has imported no cryptography, and its memory map holds none of its libraries."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from mesh.security.pki import NodeIdentity
from tests.base_install import base_install, heavy_attempts, mapped_heavy_libraries, witness
from tests.procs import Meshd, join_token, kill_all, wait_until

QUIET = "[discovery]\nadvertise = false\n"


def mapped_cryptography(pid: int) -> list[str]:
    """cryptography's shared objects in the process's memory map (/proc/PID/maps): what the kernel says."""
    paths = {line.split(maxsplit=5)[5] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
             if len(line.split(maxsplit=5)) == 6 and "/cryptography/" in line}
    return sorted(paths)


def caught_up_past(node: Meshd, index: int) -> bool:
    """Whether `node` has caught up (Raft's onReady, after which it announces itself and starts its renewal and
    CA checks), applied an entry past `index` (its announcement, or another) and reaches every member."""
    try:
        status = node.status()
    except httpx.HTTPError:
        return False
    raft = status["raft"]
    return bool(raft["ready"] and raft["has_quorum"] and (raft["last_applied"] or 0) > index
                and all(m["connected"] for m in status["members"]))


def stays_without_cryptography(w: Meshd, seconds: float = 3.0) -> None:
    """w holds no cryptography now and at each look over `seconds` (its checks at start-up run within them)."""
    deadline = time.monotonic() + seconds
    while True:
        assert w.status()["node"]["on_demand_modules"] == [], "the witness imported cryptography"
        assert mapped_cryptography(w.proc.pid) == []
        if time.monotonic() >= deadline:
            return
        time.sleep(0.25)  # an observation window: what must not happen in it has no event to wait on


def test_a_joined_and_a_restarted_witness_hold_no_cryptography_while_idle(tmp_path):
    a = Meshd(tmp_path / "a", command="start", backend="null")
    a.init()
    nodes = {"a": a}
    try:
        a.start().wait_ready()
        (tmp_path / "w").mkdir()
        (tmp_path / "w" / "mesh.toml").write_text(QUIET)
        w = nodes["w"] = witness(tmp_path / "w", peer=a.address, token=join_token(a), backend="null").start()
        wait_until(lambda: w.health() == 200, 120, "w to join")
        stays_without_cryptography(w)  # the join's key and request were made by a child process
        w.interrupt()
        before = a.status()["raft"]["commit_index"]
        w = nodes["w"] = base_install(Meshd(tmp_path / "w", command="start", port=w.port, backend="null")).start()
        wait_until(lambda: caught_up_past(w, before), 120, "w to restart, catch up and reach a")
        stays_without_cryptography(w)  # the renewal check, the CA check (TrustKeeper), Raft's re-checks
        member = NodeIdentity(*((a.data_dir / name).read_bytes() for name in ("node.key", "node.pem", "ca.pem")))
        reply = httpx.get(f"https://127.0.0.1:{w.port + 3}/health", verify=member.client_context(), timeout=10)
        assert reply.status_code != 403, reply.text  # a member's certificate, trusted on the peer port
        status = w.status()
        assert status["node"]["witness"]
        stays_without_cryptography(w, 0)
        assert status["node"]["heavy_modules"] == [] and heavy_attempts(w) == []
        assert mapped_heavy_libraries(w.proc.pid) == []
    finally:
        kill_all(nodes)
