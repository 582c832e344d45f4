"""Layer split (issue #17), the parts with no model and no sockets: what a stage agrees to bind and
how a head reads its stage list."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shards.rpc_head import Stage
from shards.rpc_stage import StageError, parse_endpoint
from tests.procs import REPO


@pytest.mark.parametrize("text, expected", [("127.0.0.1:5000", ("127.0.0.1", 5000)),
                                            ("127.0.0.1:0", ("127.0.0.1", 0)),
                                            ("127.3.2.1:65535", ("127.3.2.1", 65535)),
                                            ("[::1]:5000", ("::1", 5000))])
def test_a_stage_binds_loopback_endpoints(text, expected):
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize("text", ["0.0.0.0:5000", "192.168.1.5:5000", "[::]:5000", "10.0.0.1:0"])
def test_a_stage_refuses_every_address_beyond_loopback(text):
    """The RPC protocol has no authentication: a stage is reached through the mesh's mTLS, never directly."""
    with pytest.raises(StageError, match="loopback only"):
        parse_endpoint(text)


@pytest.mark.parametrize("text", ["localhost:5000", "127.0.0.1", "127.0.0.1:", "127.0.0.1:70000", ":5000",
                                  "127.0.0.1:-1", "127.0.0.1:x"])
def test_a_malformed_endpoint_is_an_error(text):
    with pytest.raises(StageError, match="endpoint"):
        parse_endpoint(text)


def test_the_stage_command_refuses_a_public_endpoint_before_loading_anything():
    done = subprocess.run([sys.executable, "-m", "shards.rpc_stage", "--endpoint", "0.0.0.0:0"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "loopback only" in done.stderr


@pytest.mark.parametrize("text, expected", [("127.0.0.1:5000=9", Stage("127.0.0.1:5000", 9)),
                                            ("[::1]:5000=1", Stage("[::1]:5000", 1))])
def test_a_head_reads_stages_as_endpoint_and_layers(text, expected):
    assert Stage.parse(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1:5000", "127.0.0.1:5000=0", "127.0.0.1:5000=x", "=9", "a=-1"])
def test_a_bad_stage_is_an_error(text):
    with pytest.raises(ValueError, match="ENDPOINT=LAYERS"):
        Stage.parse(text)
