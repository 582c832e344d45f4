"""Five members; the leader and one more are killed while a client keeps asking a survivor, plain
and streamed: no request fails, and every answer (greedy) is the one an undisturbed mesh gives."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading

import httpx

from tests.procs import kill_all, start_mesh, wait_until

MODEL = "gemma-3-270m"


def test_losing_the_leader_and_one_more_fails_no_request(tmp_path):
    nodes = start_mesh(tmp_path, ["a", "b", "c", "d", "e"], replicas_on=["c", "d"])
    a = nodes["a"]
    with contextlib.ExitStack() as stack:
        stack.callback(kill_all, nodes)
        leader = next(m["name"] for m in a.status()["members"] if m["leader"])
        # Kill the leader and one more member, keeping one replica; the client talks to a survivor.
        victims = [leader, next(n for n in "abedc" if n != leader and {leader, n} != {"c", "d"})]
        survivor = nodes[next(n for n in "eabdc" if n not in victims)]
        prompts = [f"Count to {k}." for k in range(2, 7)]
        http = httpx.Client(base_url=survivor.base_url, timeout=120)
        stack.callback(http.close)

        def ask(prompt: str, stream: bool, midway=None) -> tuple[bool, str]:
            body = {"model": MODEL, "max_tokens": 24, "temperature": 0, "stream": stream,
                    "messages": [{"role": "user", "content": prompt}]}
            if not stream:
                reply = http.post("/v1/chat/completions", json=body)
                return reply.status_code == 200, reply.json()["choices"][0]["message"]["content"] \
                    if reply.status_code == 200 else reply.text
            text, finishes, done = "", 0, False
            with http.stream("POST", "/v1/chat/completions", json=body) as reply:
                if reply.status_code != 200:
                    return False, reply.read().decode()
                for line in reply.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            return False, line
                        for choice in chunk["choices"]:
                            text += choice["delta"].get("content") or ""
                            finishes += bool(choice["finish_reason"])
                        if midway is not None and len(text) > 10:
                            midway()  # the leader dies while this stream is being relayed
                            midway = None
            return done and finishes == 1, text

        reference = {p: ask(p, stream=False)[1] for p in prompts}  # greedy: what every answer must be
        results: list[tuple[str, bool, bool, str]] = []
        stop = threading.Event()
        killed = threading.Event()

        def kill_victims() -> None:
            for name in victims:  # kill -9 the leader and one more: 3 of 5 remain, still a majority
                os.kill(nodes[name].proc.pid, signal.SIGKILL)
            killed.set()

        def client() -> None:
            for i in range(40):
                if stop.is_set():
                    return
                prompt, stream = prompts[i % len(prompts)], i % 2 == 1
                ok, text = ask(prompt, stream, kill_victims if i == 5 else None)
                results.append((prompt, stream, ok, text))

        worker = threading.Thread(target=client)
        worker.start()
        try:
            assert killed.wait(180), "the client never got to the interrupted stream"
            wait_until(lambda: any(m["leader"] for m in survivor.status()["members"] if m["name"] not in victims),
                       30, "a new leader among the survivors")
            wait_until(lambda: len(results) >= 20, 240, "requests after the failover")
        finally:
            stop.set()
            worker.join(240)
        failed = [r for r in results if not r[2]]
        assert not failed, f"failed requests: {failed}"
        wrong = [r for r in results if r[3] != reference[r[0]]]
        assert not wrong, f"answers that differ from the uninterrupted ones: {wrong}"
        assert any(stream for _, stream, _, _ in results), "streams were part of the traffic"
        st = survivor.status()
        assert st["raft"]["has_quorum"]
        assert next(m["name"] for m in st["members"] if m["leader"]) not in victims

        def survivors_hold_two() -> bool:
            st = survivor.status()
            names = {m["node_id"]: m["name"] for m in st["members"]}
            return len([s for s in st["shards"] if s["state"] == "ready" and s["role"] == "reasoning"
                        and names[s["node_id"]] not in victims]) == 2
        # After the grace period the lost members' shards are placed again on survivors.
        wait_until(survivors_hold_two, 180, "two ready replicas on the survivors")


def test_a_stream_relayed_through_a_frozen_leader_resumes_on_the_next(tmp_path):
    """SIGSTOP the leader while a follower relays a stream through it: nothing resets the connection,
    so the follower must notice the election of a new leader, drop the frozen one and resume there."""
    nodes = start_mesh(tmp_path, ["a", "b", "c"], replicas_on=["b", "c"])
    frozen = None
    try:
        st = nodes["a"].status()
        leader = next(m["name"] for m in st["members"] if m["leader"])
        member = nodes[next(n for n in "bca" if n != leader)]
        body = {"model": MODEL, "max_tokens": 32, "temperature": 0, "stream": True,
                "messages": [{"role": "user", "content": "Count from one to twenty."}]}
        with httpx.Client(base_url=member.base_url, timeout=120) as http:
            reference = http.post("/v1/chat/completions", json={**body, "stream": False}).json()
            text, finishes, done = "", 0, False
            with http.stream("POST", "/v1/chat/completions", json=body) as reply:
                assert reply.status_code == 200
                for line in reply.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        assert "error" not in chunk, line
                        for choice in chunk["choices"]:
                            text += choice["delta"].get("content") or ""
                            finishes += bool(choice["finish_reason"])
                        if frozen is None and len(text) > 10:
                            frozen = nodes[leader]
                            os.kill(frozen.proc.pid, signal.SIGSTOP)
        assert frozen is not None and done and finishes == 1
        assert text == reference["choices"][0]["message"]["content"]
        assert "was replaced; closing it" in member.log()
    finally:
        if frozen is not None:
            os.kill(frozen.proc.pid, signal.SIGCONT)
        kill_all(nodes)
