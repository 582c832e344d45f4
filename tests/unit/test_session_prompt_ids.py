"""A named session's turn records its prompt's token ids: the shard reports them on admission
(locally and over gRPC), SessionTurnStart carries them into the log, and the log bounds them."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle

import grpc

from mesh.replicas.remote_shard import RemoteShard
from raft.commands import InitMesh, SessionAppend, SessionTurnEnd, SessionTurnStart, decode, encode
from raft.state import MAX_PROMPT_IDS, PROMPT_IDS_TURNS, MeshState, Turn, apply
from shards.backend_null import BOS, NullBackend
from shards.grpc_service import SERVER_OPTIONS, ShardService
from shards.local import LocalShard
from shards.types import GenerateRequest, Message, Sampling

WAIT_S = 10.0


def mesh() -> MeshState:
    return apply(MeshState(), InitMesh(mesh_id="m", name="first", created_at=1000.0))


def start(turn: int, ids: tuple[int, ...], at: float = 2000.0) -> SessionTurnStart:
    return SessionTurnStart("s", turn, (("user", f"q{turn}"),), len(ids), at + turn, ids)


def finished_turn(state: MeshState, turn: int, ids: tuple[int, ...]) -> MeshState:
    for cmd in (start(turn, ids), SessionAppend("s", turn, (7, 8), "ok"), SessionTurnEnd("s", turn, "stop", 2100.0)):
        state = apply(state, cmd)
    return state


def test_a_turn_keeps_the_prompt_ids_it_started_with():
    state = finished_turn(mesh(), 0, (2, 106, 1645, 108))
    turn = state.sessions["s"].turns[0]
    assert turn.prompt_token_ids == (2, 106, 1645, 108) and turn.prompt_tokens == 4
    assert turn.answer_tokens == (7, 8)
    # What GET /control/v1/sessions/{id} serialises (mesh/cluster/control.py: dataclasses.asdict per turn).
    assert dataclasses.asdict(turn)["prompt_token_ids"] == (2, 106, 1645, 108)


def test_prompt_ids_survive_the_log_encoding_and_old_entries_decode_without_them():
    cmd = start(0, (5, 300000, 0))
    wire = encode(cmd)
    assert wire["prompt_token_ids"] == [5, 300000, 0]
    assert decode(wire) == cmd
    del wire["prompt_token_ids"]  # an entry written before the field existed
    old = decode(wire)
    assert old.prompt_token_ids == ()
    assert apply(mesh(), old).sessions["s"].turns[0].prompt_token_ids == ()


def test_a_dump_pickled_before_the_field_existed_still_loads():
    turn = Turn(messages=(("user", "hi"),), prompt_tokens=3)
    old = object.__new__(Turn)
    object.__setattr__(old, "__dict__", {k: v for k, v in turn.__dict__.items() if k != "prompt_token_ids"})
    loaded = pickle.loads(pickle.dumps(old))
    assert "prompt_token_ids" not in loaded.__dict__
    assert loaded.prompt_token_ids == () and loaded == turn
    assert dataclasses.asdict(loaded)["prompt_token_ids"] == ()


def test_only_the_last_turns_keep_their_prompt_ids():
    state = mesh()
    for n in range(4):
        state = finished_turn(state, n, tuple(range(10 * (n + 1))))
    turns = state.sessions["s"].turns
    kept = [len(t.prompt_token_ids) for t in turns]
    assert kept == [0] * (4 - PROMPT_IDS_TURNS) + [10 * (n + 1) for n in range(4 - PROMPT_IDS_TURNS, 4)]
    assert [t.prompt_tokens for t in turns] == [10, 20, 30, 40], "the counts stay"


def test_an_unfinished_turn_replaced_by_a_new_start_takes_the_new_prompt():
    state = finished_turn(mesh(), 0, (1, 2))
    state = apply(state, start(1, (1, 2, 3)))
    state = apply(state, start(1, (1, 2, 3, 4)))
    assert [t.prompt_token_ids for t in state.sessions["s"].turns] == [(1, 2), (1, 2, 3, 4)]


def test_a_prompt_over_the_bound_is_kept_as_its_count_only():
    ids = tuple(range(MAX_PROMPT_IDS + 1))
    turn = apply(mesh(), SessionTurnStart("s", 0, (), len(ids), 2000.0, ids)).sessions["s"].turns[0]
    assert turn.prompt_token_ids == () and turn.prompt_tokens == MAX_PROMPT_IDS + 1
    ids = tuple(range(MAX_PROMPT_IDS))
    turn = apply(mesh(), SessionTurnStart("s", 0, (), len(ids), 2000.0, ids)).sessions["s"].turns[0]
    assert turn.prompt_token_ids == ids


def test_a_shard_reports_the_prompt_it_tokenized_locally_and_over_grpc():
    req = GenerateRequest(Sampling(temperature=0.0, max_tokens=3), messages=(Message("user", "hi"),))

    async def main():
        shard = LocalShard("reasoning", "m", NullBackend(), 4, "gemma")
        try:
            here = await shard.open(req)
            [_ async for _ in here.events]
            prompt, _ = await shard.chat_prompt(list(req.messages))
            assert here.prompt_token_ids == tuple(prompt) and here.prompt_tokens == len(prompt)
            assert prompt[0] == BOS and len(prompt) > 5

            server = grpc.aio.server(options=SERVER_OPTIONS)
            ShardService(lambda: {("reasoning", "m"): shard}).add_to(server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            far = RemoteShard(f"127.0.0.1:{port}", "reasoning", "m", node_id="b")
            try:
                there = await far.open(req)
                [_ async for _ in there.events]
                assert there.prompt_token_ids == tuple(prompt) and there.prompt_tokens == len(prompt)
                two = await far.open(GenerateRequest(Sampling(max_tokens=2), prompts=("ab", "c")))
                [_ async for _ in two.events]
                assert two.prompt_token_ids == (BOS, ord("a"), ord("b"), BOS, ord("c"))
            finally:
                await far.close()
                await server.stop(None)
        finally:
            shard.close()

    asyncio.run(asyncio.wait_for(main(), WAIT_S))
