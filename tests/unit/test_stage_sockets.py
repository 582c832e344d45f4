"""The Unix sockets meshd's children listen on, and meshd's wait for a stage's connection.

One helper (mesh/replicas/child_supervision.py `child_socket`) names every child's socket, shard processes
(the reconciler) and pipeline stages (the split runner) alike, in meshd's private run directory or, where its
path is too long for sun_path, in one short private directory. `receive_connection`
(shards/stage_isolation.py) ends by one deadline, its caller's, whatever it waits on."""

from __future__ import annotations

import socket
import stat
import time
from pathlib import Path

import pytest

from mesh.core.config import MeshConfig
from mesh.core.metrics import Metrics
from mesh.replicas.child_supervision import SOCKET_PATH_MAX, child_socket
from mesh.replicas.reconciler import Reconciler
from raft.records import Model
from shards.stage_isolation import receive_connection

MODEL = Model("gemma", "g.gguf", "a" * 64, 1, ("reasoning",), 512, "gemma", 10)


def reconciler(run_dir: Path) -> Reconciler:
    return Reconciler("a", None, run_dir / "models", MeshConfig(), "null", Metrics(), fetch=None, run_dir=run_dir)


def test_shard_and_stage_sockets_share_one_naming_in_the_run_directory(tmp_path):
    spec = reconciler(tmp_path)._spec("reasoning", MODEL, tmp_path / "g.gguf")
    assert Path(spec.socket) == child_socket(tmp_path, "reasoning/gemma")
    assert Path(spec.socket).parent == tmp_path
    stage = child_socket(tmp_path, "gemma", prefix="stage-")
    assert stage.parent == tmp_path and stage.name.startswith("stage-") and stage.name.endswith(".sock")
    assert stage != child_socket(tmp_path, "other", prefix="stage-") != Path(spec.socket)


def test_a_run_directory_too_deep_for_sun_path_moves_every_socket_to_one_short_private_directory(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    shard = Path(reconciler(deep)._spec("reasoning", MODEL, deep / "g.gguf").socket)
    stage = child_socket(deep, "gemma", prefix="stage-")
    assert shard.parent == stage.parent != deep, "the shard process and the stage find the same place"
    assert len(str(shard)) <= SOCKET_PATH_MAX and len(str(stage)) <= SOCKET_PATH_MAX
    assert stat.S_IMODE(shard.parent.stat().st_mode) == 0o700
    assert child_socket(deep, "gemma", prefix="stage-") == stage, "made once, not a new directory each time"
    assert child_socket(None, "gemma").parent.is_dir()  # a runner without a run directory gets one of its own
    with socket.socket(socket.AF_UNIX) as listener:  # a path the kernel takes
        listener.bind(str(stage))
    stage.unlink()


@pytest.fixture
def silent_stage(tmp_path):
    """A stage's Unix socket that accepts meshd's connection and never hands one over (a stage stuck
    starting its RPC server): what meshd waits on."""
    path = tmp_path / "stage.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(4)
        yield str(path)


def test_the_wait_for_a_stages_connection_ends_by_the_callers_deadline(silent_stage):
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        receive_connection(silent_stage, timeout=120.0, deadline=time.monotonic() + 0.5)
    assert time.monotonic() - started < 60, "the caller's deadline, not the default timeout, bounds the wait"
    with pytest.raises(TimeoutError, match="handed over no connection in time"):
        receive_connection(silent_stage, deadline=time.monotonic() - 1)  # already past: no wait at all

