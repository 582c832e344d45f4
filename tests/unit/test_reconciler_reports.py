"""A shard running on a member whose "ready" the log lost (its report proposed as the leader changed, so never
committed) reports it again, through a real one-member Raft group and a real (null-backend) shard process: before,
the member's replica stayed out of routing for good (seen in test_leader_resume.py after a leader thawed)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from mesh.core.config import MeshConfig
from mesh.core.metrics import Metrics
from mesh.replicas.reconciler import Reconciler
from raft.commands import AddMember, AssignShard, InitMesh, RegisterModel, SetShardState
from tests.unit.test_split_placer import on_one_member_raft, profile


async def _reasserts(raft, tmp_path: Path) -> None:
    async def propose(cmd):
        return await asyncio.wait_for(asyncio.wrap_future(raft.propose(cmd)), 30)

    async def until(condition, what: str) -> None:
        deadline = asyncio.get_running_loop().time() + 30
        while not condition():
            assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
            await reconciler.step()
            await asyncio.sleep(0.02)

    def state() -> str:
        return raft.state.shards[key].state

    models = tmp_path / "models"
    models.mkdir()
    (models / "g.gguf").write_bytes(b"not a real model: the null backend never reads it")
    digest = hashlib.sha256((models / "g.gguf").read_bytes()).hexdigest()
    deadline = asyncio.get_running_loop().time() + 30
    while not (raft.is_leader() and raft.is_ready()):
        assert asyncio.get_running_loop().time() < deadline, "the one-member group did not elect itself"
        await asyncio.sleep(0.02)
    for cmd in (InitMesh("mesh-1", "m", 1.0), AddMember("a", "a", "127.0.0.1:1", raft.address, profile(4096), 2.0),
                RegisterModel("gemma", "g.gguf", digest, 50, ("reasoning",), 512, "gemma", 10 << 20),
                AssignShard("reasoning", "gemma", "a")):
        await propose(cmd)
    key = ("reasoning", "gemma", "a")
    (tmp_path / "run").mkdir(mode=0o700)
    reconciler = Reconciler("a", raft, models, MeshConfig(), "null", Metrics(), fetch=None, run_dir=tmp_path / "run")
    try:
        await until(lambda: state() == "ready", "the shard to load")
        process = reconciler.local[key[:2]]
        # What the lost report leaves: the log's last word on the shard is the "loading" before it.
        await propose(SetShardState(*key, "loading", "loading the model"))
        await until(lambda: state() == "ready", "the running shard to report ready again")
        assert reconciler.local[key[:2]] is process, "reported again, not loaded again"
        assert raft.state.shards[key].detail == ""
    finally:
        await reconciler.close()


def test_a_running_shard_whose_ready_report_was_lost_reports_it_again(tmp_path):
    on_one_member_raft(tmp_path, lambda raft: _reasserts(raft, tmp_path))
