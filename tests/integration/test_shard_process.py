"""A crash in the model library costs a process, never the member: each model shard runs in a child
process of meshd. Killed mid-stream (SIGSEGV as from a bad llama.cpp build, SIGKILL as from the OOM
killer), the shard process is restarted and the client's stream completes, token-identical at
temperature 0; meshd keeps its pid; the crash shows in `meshctl status`. A crash loop ends in a
"crashed" shard with its reason, not in endless restarts."""

from __future__ import annotations

import os
import signal

import httpx
import openai
import pytest

from tests.procs import Meshd, stream_chat, wait_until

MODEL = "gemma-3-270m"
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
TOKENS = 60


def processes(node: Meshd, role: str = "reasoning") -> list[dict]:
    return [p for p in node.status()["local_shards"] if p["role"] == role]


def shard_pid(node: Meshd) -> int | None:
    ready = [p["pid"] for p in processes(node) if p["state"] == "ready"]
    return ready[0] if ready else None


def stream(client: openai.OpenAI, interrupt=None) -> tuple[str, list[str | None]]:
    return stream_chat(client, MODEL, PROMPT, TOKENS, interrupt, at=10)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("crash") / "node"
    with Meshd(data_dir) as meshd:
        meshd.wait_ready()
        yield meshd


def test_the_model_runs_in_a_child_process_offered_to_the_oom_killer(node):
    [proc] = processes(node)
    assert proc["pid"] != node.proc.pid and proc["rss_bytes"] > 50 << 20
    with open(f"/proc/{proc['pid']}/status") as f:
        assert f"PPid:\t{node.proc.pid}" in f.read()
    with open(f"/proc/{proc['pid']}/oom_score_adj") as f:
        assert int(f.read()) == 1000
    metrics = httpx.get(f"{node.base_url}/metrics", timeout=10).text
    assert 'quorum_shard_rss_bytes{model="gemma-3-270m",role="reasoning"}' in metrics


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL])
def test_stream_survives_a_crash_of_its_shard_process(node, sig):
    client = openai.OpenAI(base_url=f"{node.base_url}/v1", api_key="x", max_retries=0, timeout=120)
    reference, ref_finish = stream(client)
    assert len(reference) > 40 and ref_finish == ["length"]
    meshd_pid = node.proc.pid
    killed: list[int] = []

    def interrupt() -> None:
        pid = shard_pid(node)
        killed.append(pid)
        os.kill(pid, sig)

    text, finishes = stream(client, interrupt)
    assert killed, "the stream ended before it could be interrupted"
    assert finishes == ["length"], "one finish_reason"
    assert text == reference, "the resumed stream must equal the uninterrupted one"
    assert node.proc.poll() is None and node.proc.pid == meshd_pid, "meshd must outlive its shard"
    wait_until(lambda: node.health() == 200, 60, "/health to return to 200")
    new = wait_until(lambda: shard_pid(node), 60, "a new shard process")
    assert new != killed[0]
    [proc] = processes(node)
    assert proc["restarts"] >= 1
    assert signal.Signals(sig).name in proc["detail"], proc
    shown = node.meshctl("status")
    assert f"killed by {signal.Signals(sig).name}" in shown, shown


def test_a_crash_loop_ends_in_a_crashed_shard_with_its_reason(tmp_path):
    """The null backend: the supervision is the same and restarts take a fraction of a second."""
    with Meshd(tmp_path / "loop", backend="null") as node:
        node.wait_ready()
        seen: set[int] = set()
        for _ in range(4):
            pid = wait_until(lambda: (p := shard_pid(node)) not in seen and p, 60, "a restarted shard process")
            seen.add(pid)
            os.kill(pid, signal.SIGKILL)

        def crashed() -> dict | None:
            return next((s for s in node.status()["shards"] if s["state"] == "crashed"), None)

        shard = wait_until(crashed, 60, "the shard to be reported crashed")
        assert "crash loop" in shard["detail"] and "SIGKILL" in shard["detail"], shard
        assert node.proc.poll() is None
        assert node.health() == 503
        assert [p["state"] for p in processes(node)] == ["crashed"]
        assert any("crash-looped" in u["reason"] for u in node.status()["unplaced"]), node.status()["unplaced"]
        assert shard_pid(node) is None, "a crash-looped shard is not started again"
