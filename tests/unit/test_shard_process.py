"""mesh/replicas/shard_process.py with real child processes (the null backend: no weights): a shard serves from
its own process over a Unix socket, a process that dies is reported with how it died and its last log
lines, and stop() leaves nothing running."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from mesh.core.metrics import Metrics
from mesh.replicas.shard_process import Exit, ShardStartError, run_dir, shard_process
from shards.host import HostSpec
from shards.types import Failed, Finished, GenerateRequest, Piece, Sampling, ShardKind


def spec(tmp_path: Path, kind: str = "null", path: str = "") -> HostSpec:
    return HostSpec(role="reasoning", model="m", kind=kind, path=path, n_ctx=256, threads=1, queue_depth=2,
                    socket=str(run_dir(tmp_path) / "m.sock"), parent=os.getpid())


def test_exit_says_how_a_process_ended():
    assert Exit(-11, ("a", "b", "c", "d")).describe() == "killed by SIGSEGV; last log: b | c | d"
    assert Exit(-6, ("x", "  File y"), ("GGML_ASSERT(n > 0) failed",)).describe() == \
        "killed by SIGABRT; last log: GGML_ASSERT(n > 0) failed"
    assert Exit(3, ()).describe() == "exited with code 3"
    assert Exit(-9, ()).how == "killed by SIGKILL"


def test_spec_round_trips_through_json(tmp_path):
    s = spec(tmp_path)
    assert HostSpec.from_json(s.to_json()) == s


def test_run_dir_is_private(tmp_path):
    assert run_dir(tmp_path).stat().st_mode & 0o777 == 0o700


async def _generate(shard) -> tuple[str, list]:
    opened = await shard.open(GenerateRequest(Sampling(temperature=0, max_tokens=8), prompts=("hi",)))
    text, ends = "", []
    async for _, event in opened.events:
        if isinstance(event, Piece):
            text += event.text
        else:
            ends.append(event)
    return text, ends


def test_a_shard_serves_from_its_own_process_and_a_crash_is_reported(tmp_path):
    exits: list[Exit] = []

    async def main() -> None:
        async def on_exit(_shard, exit_: Exit) -> None:
            exits.append(exit_)

        shard = shard_process(spec(tmp_path), Metrics(), on_exit)
        assert shard.kind is ShardKind.GENERATOR
        await shard.start(60)
        try:
            assert shard.ready and shard.pid != os.getpid() and shard.n_ctx == 256 and shard.rss() > 0
            text, ends = await _generate(shard)
            assert text and isinstance(ends[-1], Finished) and ends[-1].completion_tokens == 8
            os.kill(shard.pid, signal.SIGSEGV)
            for _ in range(200):
                if exits:
                    break
                await asyncio.sleep(0.05)
            assert exits and exits[0].returncode == -signal.SIGSEGV
            assert exits[0].fatal == ("Fatal Python error: Segmentation fault",), exits[0]
            assert not shard.ready
        finally:
            await shard.stop()

    asyncio.run(main())


def test_a_stream_cut_by_a_crash_ends_in_a_retryable_failure(tmp_path, monkeypatch):
    # 50 ms a token: the answer cannot be finished (and buffered whole) before the kill lands.
    monkeypatch.setenv("QUORUM_NULL_DELAY_S", "0.05")

    async def main() -> list:
        async def on_exit(_shard, _exit) -> None:
            pass

        shard = shard_process(spec(tmp_path), Metrics(), on_exit)
        await shard.start(60)
        try:
            opened = await shard.open(GenerateRequest(Sampling(temperature=0), prompts=("hi",)))
            events = []
            async for _, event in opened.events:
                events.append(event)
                if len(events) == 2:
                    os.kill(shard.pid, signal.SIGKILL)
            return events
        finally:
            await shard.stop()

    events = asyncio.run(main())
    assert isinstance(events[-1], Failed) and events[-1].retryable


def test_a_process_that_cannot_load_fails_to_start_with_its_reason(tmp_path):
    async def main() -> None:
        async def on_exit(_shard, _exit) -> None:
            raise AssertionError("on_exit is for processes that were serving")

        shard = shard_process(spec(tmp_path, kind="onnx", path=str(tmp_path / "missing.onnx")), Metrics(), on_exit)
        assert shard.kind is ShardKind.ENCODER
        with pytest.raises(ShardStartError, match="exited with code 1"):
            await shard.start(60)

    asyncio.run(main())


def test_stop_ends_the_process(tmp_path):
    async def main() -> int:
        async def on_exit(_shard, _exit) -> None:
            raise AssertionError("a requested stop is not a crash")

        shard = shard_process(spec(tmp_path), Metrics(), on_exit)
        await shard.start(60)
        pid = shard.pid
        await shard.stop()
        return pid

    pid = asyncio.run(main())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_stuck_decoding_step_ends_the_process_so_its_streams_can_resume_elsewhere(tmp_path, monkeypatch):
    """A step that never returns (here a null token taking 30 s; in life a llama.cpp call stuck on a stage that
    never answers) leaves the process answering gRPC while its streams wait for good: past its bound the process
    ends itself (exit 70, the reason in its last log line), the stream ends Failed, and meshd restarts it."""
    monkeypatch.setenv("QUORUM_NULL_DELAY_S", "30")
    monkeypatch.setenv("QUORUM_STALL_LIMIT_S", "0.5")  # plus 1 s a prompt token for the null backend's first step
    exits: list[Exit] = []

    async def main() -> None:
        async def on_exit(_shard, exit_: Exit) -> None:
            exits.append(exit_)

        shard = shard_process(spec(tmp_path), Metrics(), on_exit)
        await shard.start(60)
        try:
            started = asyncio.get_running_loop().time()
            text, ends = await asyncio.wait_for(_generate(shard), 30)
            assert text == "" and isinstance(ends[-1], Failed), ends
            for _ in range(200):
                if exits:
                    break
                await asyncio.sleep(0.05)
            assert exits and exits[0].returncode == 70, exits
            assert "the backend is stuck; ending the shard process" in exits[0].describe()
            assert asyncio.get_running_loop().time() - started < 25  # not the 30 s token
        finally:
            await shard.stop()

    asyncio.run(main())

