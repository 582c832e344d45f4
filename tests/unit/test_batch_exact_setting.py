"""node.batch_exact: true by default, read and checked from mesh.toml, carried by the reconciler's HostSpec to the
shard process's backend (what it changes is tested with the real model in test_batching_llama.py)."""

from __future__ import annotations

import pytest

from mesh.core.config import ConfigError, MeshConfig, NodeConfig, load_config
from mesh.core.metrics import Metrics
from mesh.replicas.reconciler import Reconciler
from raft.records import Model
from shards.host import HostSpec


def test_the_setting_is_read_checked_and_carried_to_the_shard_process(tmp_path):
    path = tmp_path / "mesh.toml"
    assert NodeConfig().batch_exact is True
    path.write_text("[node]\nbatch_exact = false\n")
    cfg = load_config(path)
    assert cfg.node.batch_exact is False
    path.write_text('[node]\nbatch_exact = "no"\n')
    with pytest.raises(ConfigError, match="batch_exact"):
        load_config(path)

    model = Model("gemma", "g.gguf", "a" * 64, 1, ("reasoning",), 512, "gemma", 10)
    for config, want in ((cfg, False), (MeshConfig(), True)):
        reconciler = Reconciler("a", None, tmp_path, config, "llama", Metrics(), fetch=None, run_dir=tmp_path)
        spec = reconciler._spec("reasoning", model, tmp_path / "g.gguf")
        assert spec.batch_exact is want
        assert HostSpec.from_json(spec.to_json()) == spec
    old = spec.to_json().replace(', "batch_exact": true', "")  # a spec from before the setting
    assert HostSpec.from_json(old).batch_exact is True
