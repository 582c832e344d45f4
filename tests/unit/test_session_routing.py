"""A named session's next turn goes to the replica that served its previous turn (it still holds that
prompt's KV cache) while it is ready and has a free slot; otherwise to the least-loaded one.

The router reads the real replicated state (raft/records.py) and the gateway's admission opens real
in-process shards (LocalShard, null backend) standing in for each member's replica."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from mesh.cluster.sessions import SessionLog, recorded_replica
from mesh.core.config import MeshConfig
from mesh.core.metrics import Metrics
from mesh.gateway.admission import Admission, Sessions
from mesh.replicas.remote_shard import RemoteShard
from mesh.replicas.router import Router, slots_of
from raft.commands import InitMesh, SessionTurnEnd, SessionTurnStart, decode, encode
from raft.records import Member, MeshState, Shard, Split
from raft.state import Rejected, apply
from shards.backend_null import NullBackend
from shards.grpc_service import SERVER_OPTIONS, ShardService
from shards.local import LocalShard
from shards.types import GenerateRequest, Message, Sampling
from tests.unit.test_session_scope import LocalRaft

MODEL = "m"


def state(ready: dict[str, str]) -> MeshState:
    """Members a (this node), b and c, each with a reasoning shard of MODEL in the state given."""
    members = {n: Member(n, n, f"h:{i}", f"h:{i + 10}", {}, "active", 1.0, grpc_address=f"h:{i + 20}")
               for i, n in enumerate("abc")}
    return MeshState(members=members, shards={("reasoning", MODEL, n): Shard("reasoning", MODEL, n, st)
                                              for n, st in ready.items()})


class Replicas:
    """One in-process shard per member (the router's 'remote' replicas are these, keyed by address)."""

    def __init__(self, slots: int) -> None:
        self.by_node = {n: LocalShard("reasoning", MODEL,
                                      NullBackend(n_ctx=1024, reply_tokens=400, delay_s=0.01, slots=slots),
                                      queue_depth=4, named_template="gemma") for n in "abc"}
        self.node_of = {f"h:{i + 20}": n for i, n in enumerate("abc")}

    def remote(self, address: str, role: str, model: str, node_id: str) -> LocalShard:
        return self.by_node[self.node_of[address]]

    def close(self) -> None:
        for shard in self.by_node.values():
            shard.close()


@pytest.fixture
def replicas():
    made: list[Replicas] = []

    def make(slots: int) -> Replicas:
        made.append(Replicas(slots))
        return made[-1]
    yield make
    for r in made:
        r.close()


def router(replicas: Replicas, ready: dict[str, str]) -> Router:
    local = {("reasoning", MODEL): replicas.by_node["a"]} if ready.get("a") == "ready" else {}
    return Router("a", lambda: state(ready), lambda: local, replicas.remote)


def test_the_previous_replica_is_preferred_while_it_has_a_free_slot(replicas):
    r = replicas(slots=2)
    pick = router(r, {"a": "ready", "b": "ready", "c": "ready"}).pick
    assert pick("reasoning", MODEL)[0] == "a", "least loaded, then this node"
    assert pick("reasoning", MODEL, prefer="c")[0] == "c"

    async def busy_c():
        opened = await r.by_node["c"].open(GenerateRequest(Sampling(max_tokens=200), prompts=("x",)))
        assert pick("reasoning", MODEL, prefer="c")[0] == "c", "one of two slots taken: still c"
        second = await r.by_node["c"].open(GenerateRequest(Sampling(max_tokens=200), prompts=("y",)))
        assert r.by_node["c"].load == 2
        assert pick("reasoning", MODEL, prefer="c")[0] == "a", "c is full: the least-loaded one"
        opened.cancel()
        second.cancel()
    asyncio.run(busy_c())


def test_a_gone_or_excluded_previous_replica_falls_back(replicas):
    r = replicas(slots=1)
    assert router(r, {"a": "ready", "b": "ready", "c": "loading"}).pick("reasoning", MODEL, prefer="c")[0] == "a"
    assert router(r, {"a": "ready", "b": "ready"}).pick("reasoning", MODEL, prefer="c")[0] == "a"
    full = router(r, {"a": "ready", "b": "ready", "c": "ready"})
    assert full.pick("reasoning", MODEL, {"c"}, prefer="c")[0] == "a", "a lost replica is avoided"
    assert full.pick("reasoning", MODEL, prefer="zz")[0] == "a"


def test_slots_of_a_replica():
    class Spec:
        parallel = 3

    class Process:
        spec = Spec()
    assert slots_of(Process(), 1) == 3
    assert slots_of(object(), 2) == 2
    assert slots_of(type("S", (), {"slots": 4})(), 1) == 4


def test_sessions_map_is_bounded_and_least_recently_used_goes():
    s = Sessions(size=2)
    s.put(("k", "one", MODEL), "a")
    s.put(("k", "two", MODEL), "b")
    assert s.get(("k", "one", MODEL)) == "a"  # now the most recent
    s.put(("k", "three", MODEL), "c")
    assert s.get(("k", "two", MODEL)) is None and s.get(("k", "one", MODEL)) == "a"
    assert s.get(None) is None and s.get(("other-key", "one", MODEL)) is None


def test_admission_sends_each_turn_of_a_session_where_the_last_one_ran(replicas):
    r = replicas(slots=1)
    admission = Admission(MeshConfig(), Metrics(), router(r, {"a": "ready", "b": "ready", "c": "ready"}))
    turn = GenerateRequest(Sampling(max_tokens=3, temperature=0), messages=(Message("user", "hi"),))

    async def run():
        # a and b are busy with other work, so the session's first turn lands on c ...
        hold = [await r.by_node[n].open(GenerateRequest(Sampling(max_tokens=500), prompts=("z",))) for n in "ab"]
        first = await admission.open(MODEL, turn, session=("key", "trip"))
        assert first.resumable.node_id == "c"
        async for _ in first.events():
            pass
        for opened in hold:
            opened.cancel()
        await wait_idle(r)
        # ... and its next turns follow it there, though a (this node, least loaded on ties) is free.
        for _ in range(2):
            later = await admission.open(MODEL, turn, session=("key", "trip"))
            assert later.resumable.node_id == "c"
            async for _ in later.events():
                pass
        other = await admission.open(MODEL, turn, session=("key", "another"))
        assert other.resumable.node_id == "a", "a new session goes to the least-loaded replica"
        async for _ in other.events():
            pass
        # c full: the turn goes elsewhere, and the session follows it there.
        hold = await r.by_node["c"].open(GenerateRequest(Sampling(max_tokens=500), prompts=("z",)))
        moved = await admission.open(MODEL, turn, session=("key", "trip"))
        assert moved.resumable.node_id != "c"
        async for _ in moved.events():
            pass
        hold.cancel()
        await wait_idle(r)
        again = await admission.open(MODEL, turn, session=("key", "trip"))
        assert again.resumable.node_id == moved.resumable.node_id
        async for _ in again.events():
            pass
    asyncio.run(run())


def test_a_turn_resumed_elsewhere_moves_the_session_there():
    """A session's turn on c (over real gRPC) loses c mid-stream and resumes on b: the session's KV cache is on b
    now, so its next turn goes to b, not back to the lost c nor to the least-loaded replica (a, this member)."""
    turn = GenerateRequest(Sampling(max_tokens=300, temperature=0), messages=(Message("user", "hi"),))
    busy = GenerateRequest(Sampling(max_tokens=500), prompts=("z",))

    def null_shard() -> LocalShard:
        return LocalShard("reasoning", MODEL, NullBackend(n_ctx=1024, reply_tokens=400, delay_s=0.01, slots=1),
                          queue_depth=4, named_template="gemma")

    async def run():
        shards = {n: null_shard() for n in "abc"}
        servers, ports = {}, {}
        for n in "bc":
            server = grpc.aio.server(options=SERVER_OPTIONS)
            ShardService(lambda s=shards[n]: {("reasoning", MODEL): s}).add_to(server)
            ports[n] = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            servers[n] = server
        members = {n: Member(n, n, f"h:{i}", f"h:{i + 10}", {"parallel": 1}, "active", 1.0,
                             grpc_address=f"127.0.0.1:{ports.get(n, 1)}") for i, n in enumerate("abc")}
        state = MeshState(members=members, shards={("reasoning", MODEL, n): Shard("reasoning", MODEL, n, "ready")
                                                   for n in "abc"})
        router = Router("a", lambda: state, lambda: {("reasoning", MODEL): shards["a"]},
                        lambda address, role, model, node_id: RemoteShard(address, role, model, node_id),
                        default_slots=1)
        admission = Admission(MeshConfig(), Metrics(), router)
        # a and b busy (b through the router, which counts a remote replica's load by what it sent there)
        held = {"a": await shards["a"].open(busy), "b": await router.pick("reasoning", MODEL, prefer="b")[1].open(busy)}
        try:
            first = await admission.open(MODEL, turn, session=("key", "trip"))
            assert first.resumable.node_id == "c"
            events = first.events()
            await anext(events)
            held.pop("b").cancel()  # b frees up, a stays busy: the turn will resume on b
            await wait_until_idle(shards["b"])
            assert router.pick("reasoning", MODEL, exclude={"c"})[0] == "b"
            await servers.pop("c").stop(None)  # c is lost mid-turn
            async for _ in events:
                pass
            assert first.resumable.node_id == "b"
            held.pop("a").cancel()
            await wait_until_idle(shards["a"])
            later = await admission.open(MODEL, turn, session=("key", "trip"))
            assert later.resumable.node_id == "b", "the next turn goes where the session's KV cache now is"
            async for _ in later.events():
                pass
        finally:
            for opened in held.values():
                opened.cancel()
            await router.close()
            for server in servers.values():
                await server.stop(None)
            for shard in shards.values():
                shard.close()

    asyncio.run(asyncio.wait_for(run(), 60))


async def wait_until_idle(shard) -> None:
    for _ in range(2000):
        if shard.load == 0:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the replica did not go idle")


async def wait_idle(r: Replicas) -> None:
    for _ in range(2000):
        if all(s.load == 0 for s in r.by_node.values()):
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the replicas did not go idle")


def test_another_members_free_slots_come_from_its_profile_not_this_members():
    """Member a routes to b and c over real gRPC (RemoteShard, which reports no slots of its own). b says it
    decodes 2 sequences at once (its profile's `parallel`), c says nothing (a member from before the field), and a
    pipeline's head decodes one: a session stays on its replica while that replica has a free slot by its own
    figure, this member's (1 here) standing in only for c."""
    long = GenerateRequest(Sampling(max_tokens=400), prompts=("x",))

    async def run():
        shards = {n: LocalShard("reasoning", MODEL, NullBackend(n_ctx=1024, reply_tokens=400, delay_s=0.01, slots=2),
                                queue_depth=4, named_template="gemma") for n in "bc"}
        servers, ports = [], {}
        for n, shard in shards.items():
            server = grpc.aio.server(options=SERVER_OPTIONS)
            ShardService(lambda s=shard: {("reasoning", MODEL): s}).add_to(server)
            ports[n] = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            servers.append(server)
        profiles = {"a": {"parallel": 1}, "b": {"parallel": 2}, "c": {}}
        members = {n: Member(n, n, f"h:{i}", f"h:{i + 10}", profiles[n], "active", 1.0,
                             grpc_address=f"127.0.0.1:{ports.get(n, 1)}") for i, n in enumerate("abc")}
        shard_records = {("reasoning", MODEL, n): Shard("reasoning", MODEL, n, "ready") for n in "bc"}
        whole = MeshState(members=members, shards=shard_records)
        split = MeshState(members=members, shards=shard_records, splits={MODEL: Split(MODEL, "b", (("c", 5),))})
        current = [whole]
        router = Router("a", lambda: current[0], dict,
                        lambda address, role, model, node_id: RemoteShard(address, role, model, node_id),
                        default_slots=1)
        held = []
        try:
            assert [router.reported_slots(s, "reasoning", MODEL, n) for s in (whole, split) for n in "bc"] \
                == [2, 1, 1, 1]
            held.append(await router.pick("reasoning", MODEL)[1].open(long))  # b: one of its two slots
            assert router.pick("reasoning", MODEL, prefer="b")[0] == "b", "b has a free slot by its own figure"
            current[0] = split
            assert router.pick("reasoning", MODEL, prefer="b")[0] == "c", "a pipeline head decodes one sequence"
            current[0] = whole
            held.append(await router.pick("reasoning", MODEL, prefer="c")[1].open(long))  # c: idle, preferred
            assert router.pick("reasoning", MODEL, prefer="c")[0] == "b", "c does not say: this member's 1 slot"
        finally:
            for opened in held:
                opened.cancel()
            await router.close()
            for server in servers:
                await server.stop(None)
            for shard in shards.values():
                shard.close()

    asyncio.run(asyncio.wait_for(run(), 30))


def test_a_new_leader_sends_a_sessions_turn_where_the_log_says_its_last_turn_ended(replicas):
    """The member that ended a turn is in the log (SessionTurnEnd.replica): a leader that never routed the session
    (a fresh Admission, as after a change of leader) sends its next turn there, and records where that one ended."""
    r = replicas(slots=1)
    raft = LocalRaft(apply(MeshState(), InitMesh("m", "m", 1.0)))
    log = SessionLog(raft)
    turn = GenerateRequest(Sampling(max_tokens=3, temperature=0), messages=(Message("user", "hi"),))

    async def one_turn(admission: Admission, index: int) -> str:
        run = await admission.open(MODEL, turn, session=("", "trip"))
        run.recorder = log.recorder("trip", index, turn.messages, run.prompt_tokens, run.resumable.prompt_token_ids)
        async for _ in run.events():
            pass
        return run.resumable.node_id

    async def run():
        hold = [await r.by_node[n].open(GenerateRequest(Sampling(max_tokens=500), prompts=("z",))) for n in "ab"]
        first = Admission(MeshConfig(), Metrics(), router(r, {"a": "ready", "b": "ready", "c": "ready"}))
        assert await one_turn(first, 0) == "c"
        for opened in hold:
            opened.cancel()
        await wait_idle(r)
        assert raft.state.sessions["trip"].replica == "c"
        leader = Admission(MeshConfig(), Metrics(), router(r, {"a": "ready", "b": "ready", "c": "ready"}))
        assert await one_turn(leader, 1) == "a", "without the log's record: the least-loaded replica"
        assert raft.state.sessions["trip"].replica == "a"
        await wait_idle(r)
        hold = await r.by_node["a"].open(GenerateRequest(Sampling(max_tokens=500), prompts=("z",)))
        assert await one_turn(Admission(MeshConfig(), Metrics(), router(r, {"a": "ready", "b": "ready",
                                                                            "c": "ready"})), 2) == "b"
        hold.cancel()
        await wait_idle(r)
        wired = Admission(MeshConfig(), Metrics(), router(r, {"a": "ready", "b": "ready", "c": "ready"}))
        wired.recorded_replica = lambda owner, session_id: recorded_replica(raft.state, owner, session_id)
        assert await one_turn(wired, 3) == "b", "a new leader reads where the last turn ended"
    asyncio.run(run())


def test_the_turns_replica_is_recorded_checked_and_left_out_of_older_entries():
    state = apply(MeshState(), InitMesh("m", "m", 1.0))
    state = apply(state, SessionTurnStart("s", 0, (("user", "hi"),), 3, 2.0, owner="k1"))
    state = apply(state, SessionTurnEnd("s", 0, "stop", 3.0, replica="n-b"))
    assert recorded_replica(state, "k1", "s") == "n-b"
    assert recorded_replica(state, "k2", "s") is None, "another key's session says nothing"
    assert recorded_replica(state, "k1", "other") is None
    assert "replica" not in encode(SessionTurnEnd("s", 0, "stop", 3.0))
    assert decode(encode(SessionTurnEnd("s", 0, "stop", 3.0, replica="n-b"))).replica == "n-b"
    with pytest.raises(Rejected):
        apply(state, SessionTurnEnd("s", 0, "stop", 3.0, replica="x" * 65))
