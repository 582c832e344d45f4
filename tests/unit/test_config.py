"""mesh/core/config.py: the repository's mesh.toml is the defaults; every bad value is a ConfigError naming its key."""

from __future__ import annotations

import dataclasses

import pytest

from mesh.core.config import (
    DEFAULT_ENCODER,
    DEFAULT_MODEL,
    ConfigError,
    GatewayConfig,
    MeshConfig,
    NodeConfig,
    load_config,
    parse_config,
)
from tests.procs import REPO

SHA = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def model_toml(name: str = "m1", file: str = "m1.gguf", sha256: str = SHA, roles: str = '["reasoning"]',
               extra: str = "") -> str:
    return (f'[[models]]\nname = "{name}"\nfile = "{file}"\nsha256 = "{sha256}"\nroles = {roles}\n'
            f"context_length = 4096\n{extra}")


def load_text(tmp_path, text: str) -> MeshConfig:
    path = tmp_path / "mesh.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def expect_error(tmp_path, text: str, key: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    assert key in str(info.value), f"{key!r} not named in: {info.value}"
    return info.value


def test_repo_mesh_toml_equals_builtin_defaults():
    assert load_config(REPO / "mesh.toml") == MeshConfig()


def test_load_config_none_gives_defaults():
    cfg = load_config(None)
    assert cfg == MeshConfig()
    assert cfg.models == (DEFAULT_MODEL, DEFAULT_ENCODER)
    assert cfg.model("gemma-3-270m") is DEFAULT_MODEL
    assert cfg.models_for("reasoning") == (DEFAULT_MODEL,)
    assert cfg.models_for("context") == (DEFAULT_ENCODER,)
    assert cfg.replicas == {"reasoning": 1, "context": 1}


def test_empty_file_gives_defaults(tmp_path):
    assert load_text(tmp_path, "") == MeshConfig()


def test_partial_section_keeps_other_defaults(tmp_path):
    cfg = load_text(tmp_path, "[gateway]\nqueue_depth = 3\n")
    assert cfg.gateway == dataclasses.replace(GatewayConfig(), queue_depth=3)
    assert cfg.node == NodeConfig()


@pytest.mark.parametrize("text, key", [
    ("bogus = 1\n", "bogus"),
    ("[gateway]\nqueue_dpeth = 3\n", "gateway.queue_dpeth"),
    ("[node]\nport = 80\n", "node.port"),
    ("[raft]\nheartbeat = 50\n", "raft.heartbeat"),
    (model_toml(extra='colour = "red"\n'), "models[0].colour"),
])
def test_unknown_key_is_error_naming_it(tmp_path, text, key):
    err = expect_error(tmp_path, text, key)
    assert "unknown key" in str(err)


def test_string_for_int_is_error_naming_key(tmp_path):
    expect_error(tmp_path, '[gateway]\nqueue_depth = "16"\n', "gateway.queue_depth")


def test_bool_for_int_is_error_naming_key(tmp_path):
    expect_error(tmp_path, "[gateway]\nmax_n = true\n", "gateway.max_n")


def test_float_for_int_is_error_naming_key(tmp_path):
    expect_error(tmp_path, "[raft]\nheartbeat_ms = 50.0\n", "raft.heartbeat_ms")


def test_int_for_string_is_error_naming_key(tmp_path):
    expect_error(tmp_path, "[node]\nlisten = 8080\n", "node.listen")


@pytest.mark.parametrize("text, key", [
    ("[gateway]\nqueue_depth = -1\n", "gateway.queue_depth"),
    ("[node]\nthreads = -2\n", "node.threads"),
    ("[node]\nraft_port = -1\n", "node.raft_port"),
    ("[raft]\nheartbeat_ms = -50\n", "raft.heartbeat_ms"),
])
def test_negative_int_is_error_naming_key(tmp_path, text, key):
    err = expect_error(tmp_path, text, key)
    assert "negative" in str(err)


@pytest.mark.parametrize("key", ["queue_depth", "max_body_bytes", "max_n", "retry_after_s"])
def test_zero_where_positive_required_is_error(tmp_path, key):
    err = expect_error(tmp_path, f"[gateway]\n{key} = 0\n", f"gateway.{key}")
    assert "positive" in str(err)


def test_zero_allowed_where_default_is_zero(tmp_path):
    cfg = load_text(tmp_path, "[node]\nthreads = 0\nraft_port = 0\n")
    assert cfg.node.threads == 0 and cfg.node.raft_port == 0


@pytest.mark.parametrize("listen", ["localhost", "127.0.0.1:", ":8080", "127.0.0.1:http", "127.0.0.1:0",
                                    "127.0.0.1:70000", "127.0.0.1:-1"])
def test_bad_node_listen_is_error(tmp_path, listen):
    expect_error(tmp_path, f'[node]\nlisten = "{listen}"\n', "node.listen")


def test_raft_port_above_65535_is_error(tmp_path):
    expect_error(tmp_path, "[node]\nraft_port = 70000\n", "node.raft_port")


@pytest.mark.parametrize("lo, hi", [(300, 300), (400, 300)])
def test_election_max_not_above_min_is_error(tmp_path, lo, hi):
    expect_error(tmp_path, f"[raft]\nelection_min_ms = {lo}\nelection_max_ms = {hi}\n", "raft.election_max_ms")


def test_election_min_must_exceed_three_heartbeats(tmp_path):
    expect_error(tmp_path, "[raft]\nheartbeat_ms = 100\nelection_min_ms = 300\n", "raft.election_min_ms")


def test_unknown_role_in_replicas_is_error(tmp_path):
    expect_error(tmp_path, "[replicas]\nsummariser = 1\n", "replicas.summariser")


@pytest.mark.parametrize("count", ["-1", '"2"', "true"])
def test_bad_replica_count_is_error(tmp_path, count):
    expect_error(tmp_path, f"[replicas]\nreasoning = {count}\n", "replicas.reasoning")


def test_replicas_for_role_no_model_serves_is_error(tmp_path):
    err = expect_error(tmp_path, "[replicas]\nreasoning = 1\ntool-use = 2\n", "replicas.tool-use")
    assert "no model" in str(err)


def test_zero_replicas_or_witness_need_no_model(tmp_path):
    cfg = load_text(tmp_path, "[replicas]\nreasoning = 1\ncontext = 0\nwitness = 3\n")
    assert cfg.replicas == {"reasoning": 1, "context": 0, "witness": 3}


def test_duplicate_model_names_is_error(tmp_path):
    text = model_toml("twin", "a.gguf") + model_toml("twin", "b.gguf")
    err = expect_error(tmp_path, text, "models")
    assert "duplicate" in str(err) and "twin" in str(err)


@pytest.mark.parametrize("file", ["../x.gguf", "a/b.gguf", "/etc/passwd", "..", ".hidden.gguf", "a\\\\b.gguf"])
def test_model_file_with_a_path_is_error(tmp_path, file):
    expect_error(tmp_path, model_toml(file=file), "models[0].file")


@pytest.mark.parametrize("sha", ["abc", SHA.upper(), SHA[:-1] + "g", SHA + "0"])
def test_bad_sha256_is_error(tmp_path, sha):
    expect_error(tmp_path, model_toml(sha256=sha), "models[0].sha256")


@pytest.mark.parametrize("field, value", [("sha256", SHA + "\\n"), ("file", "m1.gguf\\n"), ("name", "m1\\n")])
def test_trailing_newline_in_model_field_is_error(tmp_path, field, value):
    expect_error(tmp_path, model_toml(**{field: value}), f"models[0].{field}")


def test_unknown_chat_template_is_error(tmp_path):
    expect_error(tmp_path, model_toml(extra='chat_template = "llama-99"\n'), "models[0].chat_template")


def test_known_chat_template_accepted(tmp_path):
    cfg = load_text(tmp_path, model_toml(extra='chat_template = "chatml"\n'))
    assert cfg.models[0].chat_template == "chatml"


@pytest.mark.parametrize("roles", ["[]", '["witness"]', '["poet"]', '"reasoning"'])
def test_bad_model_roles_is_error(tmp_path, roles):
    expect_error(tmp_path, model_toml(roles=roles), "models[0].roles")


def test_missing_model_field_is_error(tmp_path):
    expect_error(tmp_path, '[[models]]\nname = "m"\nfile = "m.gguf"\nroles = ["reasoning"]\ncontext_length = 64\n',
                 "models[0].sha256")


def test_custom_catalog_replaces_default(tmp_path):
    cfg = load_text(tmp_path, model_toml("small", "small.gguf"))
    assert [m.name for m in cfg.models] == ["small"]
    assert cfg.models[0].roles == ("reasoning",)
    assert cfg.models[0].package is None and cfg.models[0].chat_template is None


def test_invalid_toml_is_config_error(tmp_path):
    err = expect_error(tmp_path, "[gateway\nqueue_depth = 1\n", "not valid TOML")
    assert "mesh.toml" in str(err)


def test_non_utf8_file_is_config_error(tmp_path):
    path = tmp_path / "mesh.toml"
    path.write_bytes(b"[node]\nlisten = \"\xff\xfe\"\n")
    with pytest.raises(ConfigError):
        load_config(path)


def test_missing_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")


def test_section_not_a_table_is_error():
    with pytest.raises(ConfigError, match="gateway"):
        parse_config({"gateway": 3})


def test_with_overrides_applies_listen_and_threads():
    cfg = MeshConfig().with_overrides(listen="0.0.0.0:9000", threads=3)
    assert cfg.node.listen == "0.0.0.0:9000" and cfg.node.threads == 3
    assert cfg.node.port == 9000 and cfg.node.host == "0.0.0.0"
    assert cfg.gateway == MeshConfig().gateway
    assert MeshConfig().node == NodeConfig(), "overrides must not change the original"


def test_with_overrides_none_changes_nothing():
    assert MeshConfig().with_overrides() == MeshConfig()


@pytest.mark.parametrize("listen", ["nonsense", "host:abc", "host:99999"])
def test_with_overrides_rejects_bad_listen(listen):
    with pytest.raises(ConfigError, match="--listen"):
        MeshConfig().with_overrides(listen=listen)


def test_with_overrides_rejects_negative_threads():
    with pytest.raises(ConfigError, match="--threads"):
        MeshConfig().with_overrides(threads=-1)


def raft_port_of(node: NodeConfig) -> int:
    host, _, port = node.raft_address.rpartition(":")
    return int(port)


def test_raft_address_is_listen_port_plus_two_by_default():
    assert raft_port_of(NodeConfig(listen="127.0.0.1:8080")) == 8082
    assert raft_port_of(MeshConfig().with_overrides(listen="10.0.0.5:9000").node) == 9002
    assert NodeConfig(listen="127.0.0.1:8080").raft_address == "127.0.0.1:8082"


def test_raft_address_uses_raft_port_when_set():
    assert raft_port_of(NodeConfig(listen="127.0.0.1:8080", raft_port=7000)) == 7000
    assert NodeConfig(listen="127.0.0.1:8080", raft_port=7000).raft_address == "127.0.0.1:7000"


def test_wildcard_listen_without_advertise_keeps_raft_and_grpc_on_loopback():
    """A single node listening on all addresses has no peers: Raft and gRPC stay on 127.0.0.1."""
    assert NodeConfig(listen="0.0.0.0:9000").raft_address == "127.0.0.1:9002"
    assert NodeConfig(listen="0.0.0.0:9000").grpc_address == "127.0.0.1:9001"


def test_advertise_names_the_host_peers_use():
    node = MeshConfig().with_overrides(listen="0.0.0.0:9000", advertise="pi-1.local").node
    assert (node.http_address, node.grpc_address, node.raft_address) == (
        "pi-1.local:9000", "pi-1.local:9001", "pi-1.local:9002")


def test_advertise_with_a_port_is_an_error():
    with pytest.raises(ConfigError, match="--advertise"):
        MeshConfig().with_overrides(advertise="pi-1.local:9000")


def test_resolved_threads_auto_is_positive_and_explicit_wins():
    assert NodeConfig(threads=0).resolved_threads() >= 1
    assert NodeConfig(threads=5).resolved_threads() == 5


def test_security_authorities_auto_or_a_list_of_names(tmp_path):
    cfg = load_text(tmp_path, '[security]\nauthorities = ["pi5", "tower"]\nnode_cert_days = 7\n')
    assert cfg.security.authorities == ("pi5", "tower") and cfg.security.node_cert_days == 7
    for bad in ('"some"', "[]", "[1]", "true"):
        assert "security.authorities" in str(expect_error(tmp_path, f"[security]\nauthorities = {bad}\n",
                                                          "security.authorities"))
    expect_error(tmp_path, "[security]\nnode_cert_days = 0\n", "security.node_cert_days")
    expect_error(tmp_path, "[security]\ncert = 1\n", "security.cert")
