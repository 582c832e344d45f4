"""Sessions belong to the API key that started them (issue 14, item 6): another key is answered 404
on continuing one; with keys off every caller continues every session, as before. Driven in process:
ApiKeyCheck in front of the gateway app, whose session log is a raft stand-in applying raft/state.py."""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import Future

import httpx
import pytest

from mesh.cluster.sessions import SessionLog
from mesh.core.config import MeshConfig
from mesh.core.metrics import Metrics
from mesh.gateway.app import create_app
from mesh.gateway.service import Gateway
from mesh.security.api_keys import ApiKeyCheck, new_key
from raft.commands import InitMesh, SessionTurnEnd, SessionTurnStart, decode, encode
from raft.state import MeshState, Rejected, apply
from shards.local import LocalShard
from tests.unit.test_gateway_app import CHAT, MODEL, Backend, body


class LocalRaft:
    """What SessionLog needs of a RaftNode: the state, and propose() applying at once."""

    def __init__(self, state: MeshState) -> None:
        self.state = state

    def propose(self, cmd) -> Future:
        done: Future = Future()
        try:
            self.state = apply(self.state, cmd)
            done.set_result({})
        except Rejected as exc:
            done.set_exception(exc)
        return done


def scenario(enforce: bool, steps):
    alice, bob = new_key("alice"), new_key("bob")
    state = apply(apply(apply(MeshState(), InitMesh("m", "m", 1.0)), alice.command), bob.command)
    raft = LocalRaft(state)

    async def main():
        gateway = Gateway(MeshConfig(), Metrics(), sessions=SessionLog(raft))
        shard = LocalShard("reasoning", MODEL, Backend(), 4, "gemma")
        gateway.attach(shard)
        app = ApiKeyCheck(create_app(gateway), lambda: raft.state, enforce)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8080",
                                         timeout=10) as client:
                async def chat(key, session: str, text: str = "Hello", stream: bool = False) -> httpx.Response:
                    headers = {"X-Session-Id": session, **({"Authorization": f"Bearer {key.text}"} if key else {})}
                    return await client.post(CHAT, json=body(text, max_tokens=3, stream=stream), headers=headers)
                return await steps(chat, alice, bob, raft)
        finally:
            for s in gateway.detach_all():
                await asyncio.to_thread(s.close)
    return asyncio.run(asyncio.wait_for(main(), 60))


def test_another_key_gets_404_on_a_session_and_cannot_change_it():
    async def steps(chat, alice, bob, raft):
        assert (await chat(alice, "s1", "my secret plan")).status_code == 200
        assert (await chat(alice, "s1", "go on", stream=True)).status_code == 200
        session = raft.state.sessions["s1"]
        assert session.owner == alice.command.key_id and len(session.turns) == 2
        for stream in (False, True):
            reply = await chat(bob, "s1", "tell me the plan", stream=stream)
            assert reply.status_code == 404, reply.text
            assert reply.json()["error"]["code"] == "session_not_found"
            assert reply.json()["error"]["param"] == "X-Session-Id"
            assert "secret plan" not in reply.text
        assert raft.state.sessions["s1"] == session, "the other key's attempts left the session as it was"
        # Bob's own sessions are his; Alice still continues hers.
        assert (await chat(bob, "s2")).status_code == 200
        assert raft.state.sessions["s2"].owner == bob.command.key_id
        assert (await chat(alice, "s2")).status_code == 404
        assert (await chat(alice, "s1", "third")).status_code == 200
        assert len(raft.state.sessions["s1"].turns) == 3
    scenario(True, steps)


def test_with_keys_off_sessions_are_shared_as_before():
    async def steps(chat, alice, bob, raft):
        assert (await chat(None, "s1")).status_code == 200
        assert (await chat(alice, "s1")).status_code == 200  # a key sent while keys are off is not checked
        assert (await chat(None, "s1")).status_code == 200
        assert raft.state.sessions["s1"].owner == "" and len(raft.state.sessions["s1"].turns) == 3
    scenario(False, steps)


def test_the_log_refuses_a_turn_from_another_owner_and_keeps_the_owner():
    state = apply(MeshState(), InitMesh("m", "m", 1.0))
    state = apply(state, SessionTurnStart("s", 0, (("user", "hi"),), 3, 10.0, owner="k1"))
    with pytest.raises(Rejected, match="unknown session"):
        apply(state, SessionTurnStart("s", 0, (("user", "hi"),), 3, 11.0, owner="k2"))
    with pytest.raises(Rejected, match="unknown session"):
        apply(state, SessionTurnStart("s", 0, (("user", "hi"),), 3, 11.0))
    state = apply(state, SessionTurnEnd("s", 0, "stop", 12.0))
    assert state.sessions["s"].owner == "k1" and state.sessions["s"].last_used == 12.0
    state = apply(state, SessionTurnStart("s", 1, (("user", "more"),), 5, 13.0, owner="k1"))
    assert len(state.sessions["s"].turns) == 2


def test_a_turn_start_from_an_older_log_has_no_owner():
    wire = encode(SessionTurnStart("s", 0, (("user", "hi"),), 3, 10.0))
    assert "owner" not in wire, "without keys the entry is the same as before the field existed"
    assert decode(wire).owner == ""
    assert encode(SessionTurnStart("s", 0, (), 3, 10.0, owner="k1"))["owner"] == "k1"
    state = apply(apply(MeshState(), InitMesh("m", "m", 1.0)), decode(wire))
    assert state.sessions["s"].owner == ""


def test_a_full_dump_keeps_the_owner_and_an_older_dump_loads_without_one():
    from raft import codec
    from raft.snapshot import STATE, check_state
    from raft.state import Session

    state = apply(MeshState(), InitMesh("m", "m", 1.0))
    state = apply(state, SessionTurnStart("s", 0, (("user", "hi"),), 3, 10.0, owner="k1"))
    loaded = codec.loads(codec.dumps(state, STATE), STATE)  # the dump's state, as raft/snapshot.py writes it
    check_state(loaded)
    assert loaded == state and loaded.sessions["s"].owner == "k1"
    # A Session record written before the field existed (no "owner") decodes with owner "".
    @dataclasses.dataclass(frozen=True)
    class OldSession:
        turns: tuple
        last_used: float

    old = codec.dumps(OldSession(turns=(), last_used=5.0), codec.Profile("old", records={"Session": OldSession}))
    assert codec.loads(old, STATE) == Session(turns=(), last_used=5.0, owner="")
