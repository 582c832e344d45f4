"""Five members; the leader and one more are killed while a client keeps asking a survivor."""

from __future__ import annotations

import contextlib
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
        results: list[int] = []
        stop = threading.Event()
        fifth = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=survivor.base_url, timeout=120) as http:
                for i in range(40):
                    if stop.is_set():
                        return
                    reply = http.post("/v1/chat/completions", json={
                        "model": MODEL, "max_tokens": 8, "temperature": 0,
                        "messages": [{"role": "user", "content": f"Count to {i % 5 + 2}."}]})
                    results.append(reply.status_code)
                    if len(results) == 5:
                        fifth.set()

        worker = threading.Thread(target=client)
        worker.start()
        try:
            assert fifth.wait(120), "the client never got going"
            for name in victims:  # kill -9 the leader and one more: 3 of 5 remain, still a majority
                nodes[name].kill()
            wait_until(lambda: any(m["leader"] for m in survivor.status()["members"] if m["name"] not in victims), 30,
                       "a new leader among the survivors")
            wait_until(lambda: len(results) >= 20, 240, "requests after the failover")
        finally:
            stop.set()
            worker.join(240)
        assert results and set(results) == {200}, f"failed requests: {[r for r in results if r != 200]}"
        st = survivor.status()
        assert st["raft"]["has_quorum"]
        assert next(m["name"] for m in st["members"] if m["leader"]) not in victims

        def survivors_hold_two() -> bool:
            st = survivor.status()
            names = {m["node_id"]: m["name"] for m in st["members"]}
            return len([s for s in st["shards"] if s["state"] == "ready" and names[s["node_id"]] not in victims]) == 2
        # After the grace period the lost members' shards are placed again on survivors.
        wait_until(survivors_hold_two, 180, "two ready replicas on the survivors")
