"""A minority cut off from the mesh refuses writes and says so; the majority keeps serving; the
minority catches up when the partition heals.

Each member runs in a network namespace of its own with two links: a "mesh" link (Raft, gRPC and
the members' HTTP between each other, on one bridge) and a "client" link the test uses (on
another). The partition takes c's mesh link down; the test can still talk to c over its client
link. Needs root and `ip netns` (skipped without them).

What it checks is what needs meshd processes: the cut-off member's HTTP answers and the majority's gateway. The
consensus underneath (the minority commits nothing, the majority goes on, the minority catches up; a cut-off
leader steps down) runs in-process in tests/unit/test_raft_harness_consensus.py, in well under a second.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

import httpx
import pytest

from tests.procs import Meshd, wait_until

MODEL = "gemma-3-270m"
PORT = 7100


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Net:
    """Two bridges (mesh, client) and one namespace per member, each linked to both."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid() % 10000:04d}"
        self.mesh_bridge, self.client_bridge = f"qm{self.tag}", f"qc{self.tag}"
        self.namespaces: list[str] = []
        self.links: list[str] = []

    def up(self) -> None:
        for bridge, subnet in ((self.mesh_bridge, "10.213.0.1/24"), (self.client_bridge, "10.214.0.1/24")):
            ip("link", "add", bridge, "type", "bridge")
            ip("addr", "add", subnet, "dev", bridge)
            ip("link", "set", bridge, "up")

    def member(self, index: int) -> str:
        ns = f"q{self.tag}n{index}"
        ip("netns", "add", ns)
        self.namespaces.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")
        for kind, bridge, net in (("m", self.mesh_bridge, "10.213.0"), ("c", self.client_bridge, "10.214.0")):
            outside = f"q{self.tag}{kind}{index}"
            ip("link", "add", outside, "type", "veth", "peer", "name", f"eth{kind}", "netns", ns)
            self.links.append(outside)
            ip("link", "set", outside, "master", bridge, "up")
            ip("-n", ns, "addr", "add", f"{net}.{10 + index}/24", "dev", f"eth{kind}")
            ip("-n", ns, "link", "set", f"eth{kind}", "up")
        return ns

    def cut(self, index: int, down: bool) -> None:
        ip("link", "set", f"q{self.tag}m{index}", "down" if down else "up")

    def down(self) -> None:
        for ns in self.namespaces:
            with contextlib.suppress(subprocess.CalledProcessError):
                ip("netns", "del", ns)
        for link in (*self.links, self.mesh_bridge, self.client_bridge):
            with contextlib.suppress(subprocess.CalledProcessError):
                ip("link", "del", link)


@pytest.fixture()
def net():
    probe = subprocess.run(["ip", "netns", "add", f"qprobe{os.getpid()}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"network namespaces unavailable here: {probe.stderr.decode().strip()}")
    subprocess.run(["ip", "netns", "del", f"qprobe{os.getpid()}"], capture_output=True)
    n = Net()
    try:
        n.up()
        yield n
    finally:
        n.down()


def member(net: Net, root, index: int, name: str, *extra: str, command: str = "join") -> Meshd:
    ns = net.member(index)
    return Meshd(root / name, *extra, command=command, name=name, port=PORT, host=f"10.214.0.{10 + index}",
                 listen=f"0.0.0.0:{PORT}", advertise=f"10.213.0.{10 + index}", prefix=("ip", "netns", "exec", ns),
                 https=True)  # beyond loopback the control API answers only over HTTPS


def test_cut_off_minority_refuses_writes_majority_serves_and_it_heals(net, tmp_path):
    a = member(net, tmp_path, 0, "a", command="start")
    a.init()
    nodes = [a]
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [n.kill() for n in nodes])
        a.start().wait_ready()
        for index, name in ((1, "b"), (2, "c")):
            token = a.post("/control/v1/tokens", {"ttl_s": 3600}).json()["token"]
            node = member(net, tmp_path, index, name, "--peer", f"10.213.0.10:{PORT}", "--token", token)
            nodes.append(node.start())
            wait_until(lambda n=node: n.health() == 200, 120, f"{name} to join")
        a_, b, c = nodes
        # The members listen beyond loopback, so the gateway wants an API key (known to every member).
        auth = {"Authorization": f"Bearer {a_.post('/control/v1/keys', {'name': 'test'}).json()['key']}"}
        # c holds no shard: the reasoning replica is on a or b, in the majority.
        a_.post("/control/v1/assign", {"role": "reasoning", "node": "a"})
        wait_until(lambda: all(s["node_id"] != c.status()["node"]["id"] for s in a_.status()["shards"]), 60,
                   "no shard on c")

        net.cut(2, down=True)
        wait_until(lambda: c.status()["raft"]["leader"] is None, 30, "c to notice it is cut off")
        # The minority refuses writes and says so.
        refused = c.post("/control/v1/replicas", {"role": "reasoning", "count": 1}, timeout=60)
        assert refused.status_code == 503 and "majority" in refused.json()["error"]["message"]
        answer = httpx.post(f"{c.base_url}/v1/chat/completions", timeout=60, headers=auth, verify=c.verify,
                            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "no_leader"
        assert "Retry-After" in answer.headers or "retry-after" in answer.headers
        # The majority keeps serving and committing.
        for node in (a_, b):
            ok = httpx.post(f"{node.base_url}/v1/chat/completions", timeout=120, headers=auth, verify=node.verify,
                            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            assert ok.status_code == 200
        assert a_.post("/control/v1/replicas", {"role": "reasoning", "count": 1}).status_code == 200
        majority_commit = max(a_.status()["raft"]["commit_index"], b.status()["raft"]["commit_index"])

        net.cut(2, down=False)
        wait_until(lambda: c.status()["raft"]["has_quorum"]
                   and c.status()["raft"]["commit_index"] >= majority_commit, 60, "c to catch up")
        assert c.status()["replicas"] == a_.status()["replicas"]
        healed = httpx.post(f"{c.base_url}/v1/chat/completions", timeout=120, headers=auth, verify=c.verify,
                            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert healed.status_code == 200
