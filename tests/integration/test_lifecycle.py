"""meshd's life: first start creates the mesh, Ctrl-C stops it cleanly, a restart resumes it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import httpx
import openai
import pytest

from tests.procs import REPO, Meshd


def meshctl_cmd(node) -> list[str]:
    """meshctl against `node`, with the admin credential from its data dir."""
    return [sys.executable, "-m", "mesh.cli.meshctl", "--mesh", node.address, "--data-dir", str(node.data_dir)]


def test_first_run_creates_restart_resumes(tmp_path):
    data_dir = tmp_path / "node"
    with Meshd(data_dir) as first:
        first.wait_ready()
        before = first.status()
        reply = httpx.post(f"{first.base_url}/v1/chat/completions", timeout=120, json={
            "model": "gemma-3-270m", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})
        assert reply.status_code == 200
        assert first.interrupt() == 0, first.log()
    assert "node" in first.log() and "stopped" in first.log()

    # What the first run made: a private key (no mesh-wide secret any more), the journal, the verified model file.
    assert stat.S_IMODE(os.stat(data_dir / "node.key").st_mode) == 0o600
    assert not (data_dir / "mesh.secret").exists()
    assert (data_dir / "raft" / "raft.wal").exists()
    assert (data_dir / "models" / "gemma-3-270m-q4_k_m.gguf.verified").exists()

    assert before["mesh"]["id"] and before["raft"]["is_leader"]
    [member] = before["members"]
    [shard] = [s for s in before["shards"] if s["role"] == "reasoning"]
    assert shard["role"] == "reasoning" and shard["state"] == "ready"
    assert shard["node_id"] == member["node_id"] == before["node"]["id"]

    with Meshd(data_dir) as second:
        second.wait_ready()
        after = second.status()
        assert after["mesh"]["id"] == before["mesh"]["id"], "a restart must resume the same mesh"
        assert [m["node_id"] for m in after["members"]] == [member["node_id"]]
        assert after["raft"]["commit_index"] > before["raft"]["commit_index"]
        assert [s["state"] for s in after["shards"] if s["role"] == "reasoning"] == ["ready"]
        assert "assembling" not in second.log().split("starting in")[-1], "the model must not be rebuilt"
        assert second.interrupt() == 0


def test_port_in_use_is_a_clear_error(tmp_path):
    with Meshd(tmp_path / "a", backend="null") as a:
        a.wait_ready()
        b = Meshd(tmp_path / "b", backend="null", port=a.port).start()
        try:
            assert b.proc.wait(timeout=60) == 1
            assert "cannot listen on" in b.log()
        finally:
            b.kill()


def test_bad_config_names_the_key(tmp_path):
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    (data_dir / "mesh.toml").write_text("[gateway]\nqueue_depht = 3\n")
    node = Meshd(data_dir, backend="null").start()
    try:
        assert node.proc.wait(timeout=60) == 2
        assert "gateway.queue_depht: unknown key" in node.log()
    finally:
        node.kill()


def test_gateway_with_required_api_keys(tmp_path):
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    (data_dir / "mesh.toml").write_text('[gateway]\napi_keys = "required"\n')
    with Meshd(data_dir) as node:
        node.wait_ready()  # /health stays public
        made = subprocess.run([*meshctl_cmd(node), "keys", "create",
                               "--name", "laptop"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        key = made.stdout.strip()
        good = openai.OpenAI(base_url=f"{node.base_url}/v1", api_key=key, max_retries=0, timeout=120)
        assert good.chat.completions.create(model="gemma-3-270m", max_tokens=2,
                                            messages=[{"role": "user", "content": "hi"}]).choices
        bad = openai.OpenAI(base_url=f"{node.base_url}/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError) as err:
            bad.models.list()
        assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"
        listed = subprocess.run([*meshctl_cmd(node), "keys", "list"],
                                cwd=REPO, capture_output=True, text=True, timeout=60)
        assert "laptop" in listed.stdout and key.split(".")[2] not in listed.stdout
        key_id = key.split(".")[1]
        revoked = subprocess.run([*meshctl_cmd(node), "keys", "revoke",
                                  key_id], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert revoked.returncode == 0, revoked.stderr
        with pytest.raises(openai.AuthenticationError):
            good.models.list()
