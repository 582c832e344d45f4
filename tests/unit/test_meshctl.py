"""meshctl's tables and its admin credential lookup (no mesh needed)."""

from __future__ import annotations

from mesh.cli.meshctl import admin_token, build_parser, render_status

STATUS = {
    "mesh": {"id": "f" * 32, "name": "home"},
    "raft": {"term": 3, "commit_index": 42, "has_quorum": True},
    "health": {"detail": "ok"},
    "members": [
        {"node_id": "n1", "name": "desk", "http_address": "10.0.0.2:8080", "state": "active", "leader": True,
         "profile": {"device_class": "desktop", "ram_total": 16 << 30, "cores": 8}},
        {"node_id": "n2", "name": "pi", "http_address": "10.0.0.3:8080", "state": "active",
         "profile": {"device_class": "raspberry-pi", "ram_total": 4 << 30, "cores": 4}},
        {"node_id": "n3", "name": "router", "http_address": "10.0.0.1:8080", "state": "active", "witness": True,
         "profile": {"device_class": "openwrt-router", "ram_total": 256 << 20, "cores": 1}},
    ],
    "shards": [
        {"role": "reasoning", "model": "gemma-3-270m", "node_id": "n1", "state": "ready", "detail": ""},
        {"role": "reasoning", "model": "gemma-3-270m", "node_id": "n2", "state": "loading", "detail": "50%"},
        {"role": "context", "model": "all-minilm-l6-v2", "node_id": "n2", "state": "ready", "detail": ""},
    ],
    "replicas": {"reasoning": 2, "context": 1, "tool-use": 0},
    "unplaced": [],
}


def test_status_shows_replicas_per_role():
    text = render_status(STATUS)
    rows = {line.split()[0]: line.split() for line in text.splitlines()[-5:] if line and not line.startswith("-")}
    assert rows["reasoning"][1:4] == ["2", "1", "desk"]  # desired 2, one ready (the other still loading)
    assert rows["context"][1:4] == ["1", "1", "pi"]
    assert rows["tool-use"][1:4] == ["0", "0", "-"]
    assert rows["witness"][1:4] == ["-", "1", "router"]
    assert any(line.startswith("router") and line.endswith("witness") for line in text.splitlines())


def test_admin_token_comes_from_flag_env_or_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("QUORUM_ADMIN_TOKEN", raising=False)
    (tmp_path / "admin.token").write_text("qadm1.fromfile\n")
    assert admin_token(build_parser().parse_args(["--data-dir", str(tmp_path), "status"])) == "qadm1.fromfile"
    assert admin_token(build_parser().parse_args(["--admin-token", "qadm1.flag", "status"])) == "qadm1.flag"
    monkeypatch.setenv("MESH_DATA_DIR", str(tmp_path / "nowhere"))
    assert admin_token(build_parser().parse_args(["status"])) is None
