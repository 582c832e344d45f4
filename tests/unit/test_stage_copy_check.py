"""A stage member's copy of a split model's GGUF is hashed off the event loop, in a task of its own
(mesh/replicas/copy_check.py): the reconciler's step that asks returns at once, the loop keeps running while a
large file is hashed, and the verdict is kept per (path, size, mtime), so it is not hashed again each step.

Large copies are sparse files (they cost no disk, and are read and hashed like any other)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

from mesh.replicas.copy_check import CopyCheck
from mesh.replicas.splits import SplitRunner
from raft.commands import RegisterModel, SetSplit
from raft.state import apply
from shards.model_files import is_verified
from tests.unit.test_rpc_tunnel import STAGE
from tests.unit.test_split import mesh
from tests.unit.test_split_stages import Identity, Recorder

WAIT_S = 120.0  # a few hundred MiB hashed on a busy 2-core machine, with room to spare
GIB = 1 << 30


def sparse(path: Path, size: int, head: bytes = b"") -> Path:
    with path.open("wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def sha_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


async def until(check, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)  # polling a condition, bounded


def test_a_large_copy_is_hashed_while_the_loop_runs_and_its_verdict_is_kept(tmp_path):
    copy = sparse(tmp_path / "m.gguf", 256 << 20, b"not the mesh's model")
    woken = []

    async def run():
        check = CopyCheck(lambda: woken.append(True))
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        tick = asyncio.create_task(ticker())
        try:
            assert check.verdict("m", copy, "a" * 64) == (False, None)  # returned at once: hashing in a task
            assert check.checking("m")
            await until(lambda: woken, "no verdict")
            during = ticks
            known, reason = check.verdict("m", copy, "a" * 64)
            assert known and "copy of m.gguf differs from the mesh's (sha256 check" in reason
            assert not check.checking("m"), "the verdict came from what it knew, without hashing again"
            os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changed: hashed anew
            assert check.verdict("m", copy, "a" * 64) == (False, None)
            await check.close()
            return during
        finally:
            tick.cancel()
            await asyncio.gather(tick, return_exceptions=True)  # cancelled on purpose

    during = asyncio.run(run())
    assert during > 1, "the event loop ran while the copy was hashed"


def test_a_matching_copy_is_stamped_so_no_later_ask_hashes_it(tmp_path):
    copy = sparse(tmp_path / "m.gguf", 64 << 20, b"the mesh's model")
    sha = sha_of(copy)

    async def run():
        woken = asyncio.Event()
        check = CopyCheck(woken.set)
        assert check.verdict("m", copy, sha) == (False, None)
        await asyncio.wait_for(woken.wait(), WAIT_S)
        assert check.verdict("m", copy, sha) == (True, None)
        fresh = CopyCheck(woken.set)  # as after a restart of meshd: the stamp answers, nothing is hashed
        assert fresh.verdict("m", copy, sha) == (True, None) and not fresh.checking("m")
        assert CopyCheck(woken.set).verdict("m", tmp_path / "none.gguf", sha) == (True, None)  # no copy here

    asyncio.run(run())
    assert is_verified(copy, sha)


def test_closing_stops_a_hash_in_flight_without_a_verdict(tmp_path):
    copy = sparse(tmp_path / "m.gguf", 8 * GIB)  # far longer to hash than the test takes to close it

    async def run():
        check = CopyCheck(lambda: None)
        assert check.verdict("m", copy, "a" * 64) == (False, None)
        check.keep(set())  # no longer wanted here: its thread ends at its next block
        await check.close()  # and waits for its task
        return check

    check = asyncio.run(run())
    assert not check.checking("m") and check._verdicts == {}, "stopped before it knew: no verdict kept"


def test_the_runners_step_returns_while_its_stage_copy_is_hashed(tmp_path):
    """The split runner as the reconciler steps it: the stage stays "starting" (checking its copy) and the step
    returns; the verdict wakes the next step, which fails the stage with the reason, and later steps know it."""
    models = tmp_path / "models"
    models.mkdir()
    sparse(models / "s.gguf", 256 << 20, b"not the model")
    state = apply(mesh(), RegisterModel("split-me", "s.gguf", "a" * 64, 1, ("reasoning",), 512, None, 10))
    recorder = Recorder(apply(state, SetSplit("split-me", "a", (("b", 5),))))

    async def run():
        woken = asyncio.Event()
        runner = SplitRunner("b", lambda: recorder.state, Identity(STAGE), "127.0.0.1", 0, threads=1,
                             cache_dir=tmp_path, wake=woken.set, report=recorder, models_dir=models)
        runner.tunnel_port = 0
        try:
            await runner.step(recorder.state)
            assert runner.copies.checking("split-me"), "the step returned while the copy is hashed"
            assert runner.states["split-me"][0] == "starting" and "checking" in runner.states["split-me"][1]
            assert runner.stages == {}
            deadline = time.monotonic() + WAIT_S
            while runner.states["split-me"][0] != "failed":
                assert time.monotonic() < deadline, runner.status()
                woken.clear()
                await runner.step(recorder.state)
                await asyncio.wait_for(woken.wait(), WAIT_S)  # as the reconciler waits between steps
            await asyncio.gather(*runner._reporting.values(), return_exceptions=True)
            assert runner._copy_verdict(recorder.state, "split-me")[0], "known, not hashed again"
            return runner.states["split-me"]
        finally:
            await runner.close()

    state, detail = asyncio.run(run())
    assert "copy of s.gguf differs from the mesh's" in detail
    assert recorder.state.splits["split-me"].stage_state("b")[0] == "failed"
