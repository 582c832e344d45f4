"""LAN discovery with real meshd processes on loopback: `meshd join --discover` finds a running member
by mDNS and joins through it without being told an address; a member with advertising off is not
found; a node whose mDNS cannot start still runs.

Each test advertises under a DNS-SD service type of its own (set in its mesh.toml), so parallel runs
and other meshes on this machine never see each other. The nodes listen on 127.0.0.1, so mDNS is
spoken on the loopback interface only. Skipped where multicast on loopback does not work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import subprocess
import sys

import httpx
import pytest

from mesh.cluster.discovery import advertise, browse
from mesh.core.config import DiscoveryConfig, MeshConfig, NodeConfig
from tests.procs import REPO, Meshd, guarded, join_token, kill_all, wait_until

MDNS_GROUP = "224.0.0.251"


@pytest.fixture(scope="module", autouse=True)
def loopback_multicast():
    """Skips the module unless a multicast datagram sent on loopback comes back (checked with plain
    sockets, so a bug in discovery cannot turn into a skip)."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("", 0))
        rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                      socket.inet_aton(MDNS_GROUP) + socket.inet_aton("127.0.0.1"))
        rx.settimeout(5)
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        tx.sendto(b"quorum-probe", (MDNS_GROUP, rx.getsockname()[1]))
        assert rx.recv(64) == b"quorum-probe"
    except OSError as exc:
        pytest.skip(f"multicast on loopback does not work here: {exc}")
    finally:
        rx.close()
        tx.close()


def service_type() -> str:
    return f"_qt{os.getpid() % 100000}{secrets.token_hex(2)}._tcp.local."


def node_dir(root, name: str, service: str, advertise_on: bool = True):
    """A data dir whose mesh.toml sets discovery and a catalog model nobody has: the tests need
    membership only, so no node spends time assembling or loading a model."""
    data_dir = root / name
    data_dir.mkdir(parents=True)
    (data_dir / "mesh.toml").write_text(
        f'[discovery]\nadvertise = {str(advertise_on).lower()}\nservice = "{service}"\n\n'
        f'[[models]]\nname = "absent"\nfile = "absent.gguf"\nsha256 = "{"0" * 64}"\nroles = ["reasoning"]\n'
        "context_length = 4096\n", encoding="utf-8")
    return data_dir


def running(node: Meshd) -> bool:
    """The node answers and its Raft group has a leader (it holds no model, so /health stays 503)."""
    if node.proc.poll() is not None:
        raise RuntimeError(f"meshd exited with {node.proc.returncode}:\n{node.log()}")
    try:
        raft = node.status().get("raft")
    except httpx.HTTPError:
        return False
    if raft is None:  # refused (401) while the joiner is still writing its admin credential
        return False
    return bool(raft["has_quorum"] and raft["leader"])


def found(service: str, timeout: float = 2.0, mesh_id: str | None = None) -> list:
    return asyncio.run(browse(service, "127.0.0.1", timeout, mesh_id))


def live_names(node: Meshd) -> list[str]:
    return sorted(m["name"] for m in node.status()["members"])


def test_join_discover_finds_a_member_and_joins_without_its_address(tmp_path):
    service = service_type()
    a = Meshd(node_dir(tmp_path, "a", service), command="start", backend="null")
    a.init()
    nodes = {"a": a}
    try:
        a.start()
        wait_until(lambda: running(a), 120, "a to run")
        mesh_id = a.status()["mesh"]["id"]
        seen = wait_until(lambda: found(service, mesh_id=mesh_id), 60, "a's advertisement")
        assert [(c.address, c.name) for c in seen] == [(a.address, "a")]

        b = nodes["b"] = Meshd(node_dir(tmp_path, "b", service), "--discover", "--token", join_token(a),
                               command="join", backend="null").start()
        assert str(a.port) not in " ".join(b.args), "the joiner must not be told the member's address"
        wait_until(lambda: live_names(a) == ["a", "b"], 120, "b to become a member")
        wait_until(lambda: running(b), 60, "b to run")
        # b serves its status as soon as it runs; its copy of the log may still be catching up.
        wait_until(lambda: b.status()["mesh"]["id"] == mesh_id, 60, "b's log to hold the mesh")
        assert f"through {a.address}" in b.log()
        # The new member advertises too, under the same mesh id.
        wait_until(lambda: sorted(c.address for c in found(service, mesh_id=mesh_id)) == sorted([a.address, b.address]),
                   60, "b's advertisement")
        # A clean stop says goodbye: b is gone from the LAN, a is still there.
        assert b.interrupt() == 0
        wait_until(lambda: [c.address for c in found(service, mesh_id=mesh_id)] == [a.address], 30,
                   "b's advertisement to go")
    finally:
        kill_all(nodes)


def test_node_with_advertising_off_is_not_found(tmp_path):
    service = service_type()
    quiet = Meshd(node_dir(tmp_path, "quiet", service, advertise_on=False), command="start", backend="null")
    loud = Meshd(node_dir(tmp_path, "loud", service), command="start", backend="null")
    nodes = {"quiet": quiet, "loud": loud}
    try:
        for node in nodes.values():
            node.init()
            node.start()
        for node in nodes.values():
            wait_until(lambda n=node: running(n), 120, f"{node.name} to run")
        quiet_mesh, loud_mesh = quiet.status()["mesh"]["id"], loud.status()["mesh"]["id"]
        # Browsing works here (the advertising node is found) ...
        wait_until(lambda: found(service, mesh_id=loud_mesh), 60, "the advertising node")
        # ... and in a full, bounded browse the quiet one never answers.
        assert found(service, timeout=3, mesh_id=quiet_mesh) == []
        assert {c.mesh_id for c in found(service, timeout=3)} == {loud_mesh}
        assert "not advertised" not in quiet.log() and "advertised on the LAN" not in quiet.log()

        # A joiner holding the quiet mesh's token ignores the other mesh (another CA fingerprint) and
        # sends its token nowhere.
        joiner = nodes["joiner"] = Meshd(node_dir(tmp_path, "joiner", service), "--discover", "--discover-timeout",
                                         "3", "--token", join_token(quiet), command="join", backend="null").start()
        assert joiner.proc.wait(timeout=120) == 1
        assert "no member of the token's mesh answered on the LAN" in joiner.log()
        assert loud.address not in joiner.log()
        assert live_names(quiet) == ["quiet"] and live_names(loud) == ["loud"]
    finally:
        kill_all(nodes)


def test_join_discover_with_nobody_advertising_fails_within_its_timeout(tmp_path):
    joiner = Meshd(node_dir(tmp_path, "joiner", service_type()), "--discover", "--discover-timeout", "1",
                   "--token", "qjt1.000000000000." + "A" * 43 + "." + "B" * 43, command="join", backend="null").start()
    try:
        assert joiner.proc.wait(timeout=60) == 1
        assert "no member of the token's mesh answered on the LAN" in joiner.log()
    finally:
        joiner.kill()


def test_the_advertisement_follows_a_ca_rotation():
    """After a CA rotation join tokens carry the new CA's fingerprint, and `join --discover` matches members by
    it: each advertisement is updated when the member's identity changes (the real advertise and browse, on
    loopback)."""
    service = service_type()
    cfg = MeshConfig(node=NodeConfig(listen="127.0.0.1:18080"), discovery=DiscoveryConfig(service=service))
    mesh_id, signing = "b" * 32, ["old-ca-fingerprint"]

    async def drill() -> tuple[list[str], list[str]]:
        changed = asyncio.Event()
        task = asyncio.create_task(advertise(cfg, mesh_id, "0123456789abcdef", "a", lambda: signing[0], changed))

        async def cas_seen(want: str) -> list[str]:
            for _ in range(30):  # bounded: each browse waits up to 2 s
                seen = [c.ca for c in await browse(service, "127.0.0.1", 2.0, mesh_id)]
                if seen == [want]:
                    break
            return seen
        try:
            before = await cas_seen("old-ca-fingerprint")
            signing[0] = "new-ca-fingerprint"
            changed.set()
            return before, await cas_seen("new-ca-fingerprint")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    before, after = asyncio.run(asyncio.wait_for(drill(), 120))
    assert before == ["old-ca-fingerprint"] and after == ["new-ca-fingerprint"]


def test_advertise_returns_with_one_line_when_mdns_cannot_start(caplog):
    """An address on no interface of this machine (TEST-NET-3): zeroconf cannot join the multicast
    group there."""
    absent = "203.0.113.77"
    with socket.socket() as s, pytest.raises(OSError):
        s.bind((absent, 0))  # the premise: not an address of this machine
    cfg = MeshConfig(node=NodeConfig(listen=f"{absent}:8080"))
    with caplog.at_level(logging.WARNING, logger="quorum.discovery"):
        asyncio.run(asyncio.wait_for(advertise(cfg, "a" * 32, "0123456789abcdef", "n"), 30))
    lines = [r for r in caplog.records if r.name == "quorum.discovery"]
    assert len(lines) == 1 and "not advertised on the LAN" in lines[0].getMessage()


@pytest.fixture()
def netns():
    name = f"qd{os.getpid() % 100000}{secrets.token_hex(2)}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"network namespaces unavailable here: {made.stderr.strip()}")
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def test_node_runs_when_the_mdns_port_is_taken(tmp_path, netns):
    """Another program holds UDP 5353 exclusively (in a namespace of the test's own): the node logs one
    line and serves as usual."""
    exec_in = ("ip", "netns", "exec", netns)
    holder = subprocess.Popen(guarded([*exec_in, sys.executable, "-c",
                               "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                               "s.bind(('0.0.0.0', 5353)); print('held', flush=True); sys.stdin.read()"]),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    node = Meshd(node_dir(tmp_path, "a", service_type()), command="start", backend="null", port=7300, prefix=exec_in)
    try:
        assert holder.stdout.readline().strip() == "held"
        node.init()
        node.start()

        def answers() -> bool:
            """Asked from inside the namespace (the node's loopback is not this process's); any HTTP
            answer will do (the node holds no model, so /health says 503)."""
            probe = subprocess.run([*exec_in, sys.executable, "-c",
                                    f"import httpx; print(httpx.get('{node.base_url}/health', timeout=2).status_code)"],
                                   cwd=REPO, capture_output=True, text=True, timeout=60)
            if node.proc.poll() is not None:
                raise RuntimeError(f"meshd exited with {node.proc.returncode}:\n{node.log()}")
            return probe.returncode == 0 and probe.stdout.strip().isdigit()

        wait_until(answers, 120, "the node to serve HTTP")
        wait_until(lambda: "not advertised on the LAN" in node.log(), 30, "the discovery warning")
        assert node.log().count("not advertised on the LAN") == 1
        assert "UDP port 5353 is held by another program" in node.log()
        assert "ERROR" not in node.log()  # one warning line, no error
        assert answers(), "the node must keep serving after discovery failed"
        assert node.interrupt() == 0
    finally:
        node.kill()
        holder.kill()
        holder.wait(timeout=30)
        with contextlib.suppress(OSError):
            holder.stdout.close()

