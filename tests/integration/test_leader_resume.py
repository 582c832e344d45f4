"""Streams a member relays from the leader resume exactly through a killed (kill -9) and a frozen
(SIGSTOP) leader: /v1/completions and a streamed tool call (the chat case is in
test_leader_failover.py). Three members, each with a reasoning replica, shared by the module: a
frozen leader is thawed and a killed one restarted before the next case."""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest

from tests.procs import Meshd, kill_all, ready_replicas, start_mesh, wait_until

pytestmark = pytest.mark.model

MODEL = "gemma-3-270m"
NAMES = ["a", "b", "c"]
NOTE = {"type": "function", "function": {
    "name": "save_note", "description": "Save a note for later",
    "parameters": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 60},
                                                    "body": {"type": "string", "maxLength": 120}},
                   "required": ["title", "body"]}}}
COMPLETION = {"model": MODEL, "prompt": "The days of the week are Monday, Tuesday,", "max_tokens": 40,
              "temperature": 0}
TOOL_CALL = {"model": MODEL, "max_tokens": 80, "temperature": 0, "tools": [NOTE],
             "tool_choice": {"type": "function", "function": {"name": "save_note"}},
             "messages": [{"role": "user", "content": "Save a note about the meeting on Monday with the team "
                                                      "about the budget for next year."}]}


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    root = tmp_path_factory.mktemp("leader-resume")
    mesh = start_mesh(root, NAMES, replicas_on=NAMES)
    try:
        yield mesh
    finally:
        kill_all(mesh)


def leader_of(nodes: dict[str, Meshd]) -> str:
    """The leader every member names. A member just thawed from SIGSTOP may still name itself for a
    moment; trusting it alone made the test kill a follower and see no resume."""
    def agreed() -> str | None:
        named = set()
        for node in nodes.values():
            try:
                st = node.status()
            except (httpx.HTTPError, ValueError):
                return None  # a member still starting: ask again
            if not st["raft"]["has_quorum"]:
                return None
            named.add(next((m["name"] for m in st["members"] if m["leader"]), None))
        return named.pop() if len(named) == 1 and None not in named else None
    return wait_until(agreed, 30, "one leader every member names")


def completion_text(lines, at_first) -> tuple[str, int]:
    text, finishes = "", 0
    for chunk in lines:
        text += chunk["choices"][0]["text"] if chunk["choices"] else ""
        finishes += sum(bool(c["finish_reason"]) for c in chunk["choices"])
        if text:
            at_first()
    return text, finishes


def tool_call(lines, at_first) -> tuple[tuple, int]:
    name, arguments, finishes = "", "", 0
    for chunk in lines:
        for choice in chunk["choices"]:
            for call in choice["delta"].get("tool_calls") or ():
                name += call.get("function", {}).get("name") or ""
                arguments += call.get("function", {}).get("arguments") or ""
            finishes += bool(choice["finish_reason"])
        if name:
            at_first()
    return (name, arguments), finishes


def streamed(http: httpx.Client, path: str, body: dict):
    """The JSON chunks of a stream, checked to end in [DONE] with no error in between."""
    with http.stream("POST", path, json={**body, "stream": True}) as reply:
        assert reply.status_code == 200, reply.read()
        done = False
        for line in reply.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, line
                yield chunk
        assert done, "the stream ended without [DONE]"


CASES = {
    "completion": ("/v1/completions", COMPLETION, completion_text,
                   lambda r: (r["choices"][0]["text"], 1)),
    "tool_call": ("/v1/chat/completions", TOOL_CALL, tool_call,
                  lambda r: ((r["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
                              r["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]), 1)),
}


@pytest.mark.parametrize("how", ["frozen", "killed"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_relayed_stream_resumes_exactly_through_a_lost_leader(nodes, tmp_path, case, how):
    path, body, read, expected = CASES[case]
    leader = leader_of(nodes)
    member = nodes[next(n for n in NAMES if n != leader)]
    victim = nodes[leader]
    log_before = len(member.log())
    with httpx.Client(base_url=member.base_url, timeout=120) as http:
        reference = http.post(path, json=body)
        assert reference.status_code == 200, reference.text
        lost = []

        def lose_the_leader() -> None:
            if not lost:
                lost.append(victim)
                os.kill(victim.proc.pid, signal.SIGSTOP if how == "frozen" else signal.SIGKILL)

        try:
            got = read(streamed(http, path, body), lose_the_leader)
        finally:
            if lost and how == "frozen":
                os.kill(victim.proc.pid, signal.SIGCONT)
    try:
        assert lost, "the stream ended before the leader could be lost"
        assert got == expected(reference.json())
        log = member.log()[log_before:]
        assert "resuming choice 0" in log, log[-3000:]
        if how == "frozen":
            assert "was replaced; closing it" in log
    finally:
        if how == "killed":  # the next case needs all three members again
            victim.kill()
            nodes[leader] = Meshd(victim.data_dir, command="start", port=victim.port, name=leader).start()
        try:
            wait_until(lambda: ready_replicas(member) == NAMES and nodes[leader].health() == 200, 120,
                       "all three replicas again")
        except TimeoutError as e:
            seen = {n: (node.health(), ready_replicas(node)) for n, node in nodes.items()}
            raise TimeoutError(f"{e}: (health, ready replicas) by member: {seen}") from e
