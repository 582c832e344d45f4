"""One real meshd with the real default model, shared by the tests of a module."""

from __future__ import annotations

import pytest

from tests.procs import Meshd


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("mesh") / "node"
    data_dir.mkdir()
    # A small queue so the 429 test can fill it; everything else is the default configuration.
    (data_dir / "mesh.toml").write_text("[gateway]\nqueue_depth = 1\n")
    with Meshd(data_dir) as meshd:
        meshd.wait_ready()
        yield meshd
