"""proto/: the committed generated modules are what scripts/gen-proto makes from mesh.proto now."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GENERATED = ("mesh_pb2.py", "mesh_pb2.pyi", "mesh_pb2_grpc.py")


def test_generated_modules_match_mesh_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) regenerates the modules")
    script = REPO / "scripts" / "gen-proto"
    assert os.access(script, os.X_OK), "scripts/gen-proto must be executable"
    result = subprocess.run([str(script), str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout + result.stderr
    for name in GENERATED:
        fresh = (tmp_path / "proto" / name).read_bytes()
        assert fresh == (REPO / "proto" / name).read_bytes(), (
            f"proto/{name} is out of date with proto/mesh.proto: run scripts/gen-proto and commit")


def test_generated_modules_import_from_the_repo_root():
    from proto import mesh_pb2, mesh_pb2_grpc

    assert mesh_pb2.DESCRIPTOR.package == "quorum.mesh.v1"
    assert set(mesh_pb2.DESCRIPTOR.services_by_name) == {"Shard", "Node"}
    shard = mesh_pb2.DESCRIPTOR.services_by_name["Shard"].methods_by_name
    assert shard["Generate"].server_streaming and not shard["Generate"].client_streaming
    assert not shard["Health"].server_streaming
    assert mesh_pb2.DESCRIPTOR.services_by_name["Node"].methods_by_name["FetchModel"].server_streaming
    assert hasattr(mesh_pb2_grpc, "ShardStub") and hasattr(mesh_pb2_grpc, "NodeStub")
