"""Stream continuity: the member serving a stream is killed (or frozen) mid-answer; the client's
stream completes, and at temperature 0 it equals an uninterrupted run, token for token."""

from __future__ import annotations

import concurrent.futures
import os
import signal

import httpx
import openai
import pytest

from mesh.core.config import MeshConfig
from shards.templates import render
from shards.types import Message, Sampling
from tests.procs import Meshd, kill_all, ready_replicas, serves, start_mesh, stream_chat, wait_until

MODEL = "gemma-3-270m"
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
TOKENS = 90


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """a is the leader and serves the API; b and c hold the two reasoning replicas."""
    nodes = start_mesh(tmp_path_factory.mktemp("failover"), ["a", "b", "c"], replicas_on=["b", "c"])
    try:
        yield nodes
    finally:
        kill_all(nodes)


def serving(mesh) -> Meshd:
    """The member whose shard is generating right now."""
    def busy():
        return next((mesh[n] for n in ("b", "c") if any(s["busy"] for s in mesh[n].status()["local_shards"])), None)
    return wait_until(busy, 30, "a busy replica", every=0.01)


def restart(mesh, name: str) -> None:
    old = mesh[name]
    mesh[name] = Meshd(old.data_dir, command="start", port=old.port, name=name).start()
    wait_until(lambda: ready_replicas(mesh["a"]) == ["b", "c"] and serves(mesh[name]), 180,
               f"{name} to serve again")


def lead_from_a(mesh) -> None:
    """a (no replica) leads, so the member interrupted is a replica and never the client's gateway
    or the leader it relays to: a restarted member often takes the lead (pysyncobj has no pre-vote)
    and is then moved on by restarting it. Freezing the leader itself is leader failover."""
    def leader() -> str | None:
        return next((m["name"] for m in mesh["a"].status()["members"] if m.get("leader")), None)

    for _ in range(12):
        name = wait_until(leader, 30, "a leader")
        if name == "a":
            return
        mesh[name].kill()
        restart(mesh, name)
    raise AssertionError("a did not become the leader")


def stream(client: openai.OpenAI, interrupt=None) -> tuple[str, list[str | None]]:
    return stream_chat(client, MODEL, PROMPT, TOKENS, interrupt, at=12)


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_stream_survives_the_loss_of_its_replica(mesh, how):
    client = openai.OpenAI(base_url=f"{mesh['a'].base_url}/v1", api_key="x", max_retries=0, timeout=120)
    lead_from_a(mesh)
    reference, ref_finish = stream(client)
    assert len(reference) > 40 and ref_finish == ["length"]
    victim: list[Meshd] = []

    def interrupt() -> None:
        node = serving(mesh)
        victim.append(node)
        os.kill(node.proc.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)

    text, finishes = stream(client, interrupt)
    assert victim, "the stream ended before it could be interrupted"
    assert finishes == ["length"], "one finish_reason"
    assert text == reference, "the resumed stream must equal the uninterrupted one"
    name = next(n for n, node in mesh.items() if node is victim[0])
    if how == "stop":
        os.kill(victim[0].proc.pid, signal.SIGCONT)
    victim[0].kill()
    restart(mesh, name)


def chat(node: Meshd, session: str, content: str) -> httpx.Response:
    return httpx.post(f"{node.base_url}/v1/chat/completions", timeout=120, headers={"X-Session-Id": session},
                      json={"model": MODEL, "messages": [{"role": "user", "content": content}],
                            "max_tokens": 12, "temperature": 0})


def test_named_session_survives_a_full_restart_of_every_member(mesh):
    a = mesh["a"]
    first = chat(a, "trip-42", "My name is Ada. Remember it.")
    assert first.status_code == 200 and first.headers["x-session-id"] == "trip-42"
    answer = first.json()["choices"][0]["message"]["content"]
    # A streamed turn through a follower is committed too.
    with httpx.stream("POST", f"{mesh['b'].base_url}/v1/chat/completions", timeout=120,
                      headers={"X-Session-Id": "trip-42"},
                      json={"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}],
                            "max_tokens": 8, "temperature": 0, "stream": True}) as streamed:
        assert streamed.status_code == 200 and streamed.read().endswith(b"data: [DONE]\n\n")
    logged = a.get_json("/control/v1/sessions/trip-42")
    assert [t["finish_reason"] for t in logged["turns"]] == ["length", "length"]
    assert logged["turns"][0]["answer_text"] == answer
    # Each turn holds its prompt as the shard tokenized it (the second: with the first turn rendered in).
    ids = logged["turns"][0]["prompt_token_ids"]
    assert len(ids) == first.json()["usage"]["prompt_tokens"] == logged["turns"][0]["prompt_tokens"]
    assert all(isinstance(t, int) and t >= 0 for t in ids) and len(set(ids)) > 3
    assert len(logged["turns"][1]["prompt_token_ids"]) == logged["turns"][1]["prompt_tokens"] > len(ids) + 5

    for node in mesh.values():
        node.kill()  # kill -9: nothing flushed on the way out
    for name in list(mesh):
        old = mesh[name]
        mesh[name] = Meshd(old.data_dir, command="start", port=old.port, name=name).start()
    wait_until(lambda: ready_replicas(mesh["a"]) == ["b", "c"] and serves(mesh["b"]) and serves(mesh["c"]), 240,
               "the mesh to come back")

    after = mesh["c"].get_json("/control/v1/sessions/trip-42")
    assert after["turns"] == logged["turns"], "every committed turn is intact after a full restart"
    third = chat(mesh["c"], "trip-42", "What is my name?")
    assert third.status_code == 200
    # The mesh supplied the history: the prompt holds all three turns, not just the new message.
    assert third.json()["usage"]["prompt_tokens"] > first.json()["usage"]["prompt_tokens"] + 20
    turns = mesh["a"].get_json("/control/v1/sessions/trip-42")["turns"]
    assert len(turns) == 3
    assert len(turns[2]["prompt_token_ids"]) == third.json()["usage"]["prompt_tokens"]
    assert turns[0]["prompt_token_ids"] == [] and turns[0]["prompt_tokens"] == len(ids), \
        "the log keeps prompt ids on the last two turns only (raft/state.py PROMPT_IDS_TURNS)"


def test_bad_session_ids_are_400(mesh):
    r = chat(mesh["a"], "no spaces allowed", "hi")
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Session-Id"


@pytest.mark.parametrize("sampling", [Sampling(temperature=0.0), Sampling(temperature=0.8, seed=5)],
                         ids=["greedy (replay without logits)", "seeded (replay sampling each step)"])
def test_a_resumed_generation_continues_exactly_in_the_backend(mesh, sampling):
    """The backend's replay, at the cut points a failover meets: the continuation after replaying
    the first k tokens equals the uninterrupted generation (shards/backend_llama.py)."""
    from shards.backend_llama import LlamaBackend

    spec = MeshConfig().models[0]
    path = next(p for n in mesh.values() if (p := n.data_dir / "models" / spec.file).exists())
    backend = LlamaBackend(str(path), n_ctx=512, threads=1)
    try:
        rendered = render([Message(**m) for m in PROMPT], gguf_template=None, named=spec.chat_template,
                          bos=backend.bos_text, eos=backend.eos_text)
        prompt = backend.tokenize(rendered.text, add_bos=not rendered.has_bos)

        def tokens(forced: tuple[int, ...] = (), n: int = 32) -> list[int]:
            steps = backend.generate(prompt, sampling, 11, forced)
            try:
                return [next(steps).token for _ in range(n)]
            finally:
                steps.close()

        reference = tokens()
        for k in (1, 10, 23):
            assert tokens(tuple(reference[:k])) == reference, f"resumed after {k} tokens"
    finally:
        backend.close()


def test_a_generation_resumed_from_a_kv_checkpoint_continues_exactly(mesh, caplog):
    """A greedy run ships KV checkpoints (shards/backend_llama.py); resuming from one, at cut
    points just after it and several tokens later, continues exactly as the uninterrupted run.
    The checkpoint is really used: the tokens it covers are not replayed (garbage there changes
    nothing). A checkpoint that cannot be used falls back to prefill and replay, still exact."""
    from shards.backend_llama import KV_EVERY, LlamaBackend

    spec = MeshConfig().models[0]
    path = next(p for n in mesh.values() if (p := n.data_dir / "models" / spec.file).exists())
    backend = LlamaBackend(str(path), n_ctx=512, threads=1)
    greedy = Sampling(temperature=0.0)
    try:
        rendered = render([Message(**m) for m in PROMPT], gguf_template=None, named=spec.chat_template,
                          bos=backend.bos_text, eos=backend.eos_text)
        prompt = backend.tokenize(rendered.text, add_bos=not rendered.has_bos)

        def steps(forced: tuple[int, ...] = (), kv: bytes = b"", kv_tokens: int = 0, n: int = 32):
            it = backend.generate(prompt, greedy, 11, forced, kv, kv_tokens, checkpoints=True)
            try:
                return [next(it) for _ in range(n)]
            finally:
                it.close()

        first = steps()
        reference = [s.token for s in first]
        checkpoints = {i: (s.kv, s.kv_tokens) for i, s in enumerate(first) if s.kv}
        assert sorted(checkpoints) == [k * KV_EVERY - 1 for k in range(1, 5)]
        assert all(kv_tokens == len(prompt) + i for i, (_, kv_tokens) in checkpoints.items())

        with caplog.at_level("WARNING", logger="quorum.llama"):
            for at, cut in ((7, 8), (15, 19), (23, 31)):
                kv, kv_tokens = checkpoints[at]
                assert [s.token for s in steps(tuple(reference[:cut]), kv, kv_tokens)] == reference, \
                    f"resumed after {cut} tokens from the checkpoint of {at}"
                covered_wrong = (0,) * at + tuple(reference[at:cut])
                assert [s.token for s in steps(covered_wrong, kv, kv_tokens)][cut:] == reference[cut:], \
                    "the checkpoint's cache stands in for the tokens it covers"
            assert not caplog.records
            kv, kv_tokens = checkpoints[15]
            for bad in ((kv[: len(kv) // 2], kv_tokens), (kv, kv_tokens + 1), (checkpoints[23][0], kv_tokens)):
                caplog.clear()
                assert [s.token for s in steps(tuple(reference[:20]), *bad)] == reference
                assert caplog.records, "an unusable checkpoint is refused, and the resume replays instead"
    finally:
        backend.close()


def test_a_session_turn_goes_to_the_replica_holding_its_prefix(mesh):
    """Turn 1 lands on the replica the router does not pick first (that one is busy); once both are idle,
    turn 2 still goes there and prefills only what is new: its usage reports the reused prompt tokens."""
    client = openai.OpenAI(base_url=f"{mesh['a'].base_url}/v1", api_key="x", max_retries=0, timeout=120)
    story = "I keep a small garden behind the house, with tomatoes, beans, basil and two apple trees. " * 6
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        other = pool.submit(stream, client)  # an unnamed stream on the router's first choice
        first_choice = serving(mesh)
        first = chat(mesh["a"], "garden-7", story + "What should I plant next spring?")
        assert first.status_code == 200, first.text
        other.result()
    wait_until(lambda: not any(s["busy"] for n in ("b", "c") for s in mesh[n].status()["local_shards"]), 60,
               "the replicas to be idle")
    second = chat(mesh["a"], "garden-7", "And what about the autumn?")
    assert second.status_code == 200, second.text
    usage = second.json()["usage"]
    assert usage["prompt_tokens"] > first.json()["usage"]["prompt_tokens"]
    assert first.json()["usage"]["prompt_tokens_details"]["cached_tokens"] < 64
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 64, (
        f"turn 2 reused no prefix: it did not go back to the replica of turn 1 (not {first_choice.name})")
