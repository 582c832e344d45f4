"""The CA stays home (#14 item 2), against real meshd processes (null backend) on loopback: a phone-class
member never receives the CA key; while it leads, a join is signed by the authority over the peer port;
with no authority reachable a join answers 503 with the reason; the last authority is not removed without
"force"."""

from __future__ import annotations

import asyncio

import pytest

from mesh.core.config import load_config
from mesh.core.errors import StartupError
from mesh.node.bootstrap import join_mesh
from mesh.security.datadir import DataDir
from tests.procs import Meshd, free_ports, join_token, kill_all, wait_until


def leader_name(node: Meshd) -> str | None:
    return next((m["name"] for m in node.status()["members"] if m["leader"]), None)


def test_joins_through_a_phone_leader_are_signed_by_the_authority(tmp_path, monkeypatch):
    nodes: dict[str, Meshd] = {}
    try:
        a = nodes["a"] = Meshd(tmp_path / "a", command="start", backend="null")
        a.init()
        a.start().wait_ready()
        phone = nodes["phone"] = Meshd(tmp_path / "phone", "--peer", a.address, "--token", join_token(a),
                                       command="join", backend="null")
        with monkeypatch.context() as env:
            env.setenv("TERMUX_VERSION", "0.118.0")  # profiles as a termux-phone
            phone.start()
        wait_until(lambda: phone.health() == 200, 120, "the phone to join")
        assert not (phone.data_dir / "ca.key").exists()
        wait_until(lambda: a.post("/control/v1/transfer", {"to": "phone"}).status_code == 200
                   and leader_name(a) == "phone", 30, "the phone to lead")

        c = nodes["c"] = Meshd(tmp_path / "c", "--peer", phone.address, "--token", join_token(a),
                               command="join", backend="null").start()
        wait_until(lambda: c.health() == 200, 120, "c to join through the phone")
        assert "signed a join certificate" in a.log(), "the authority did not sign c's certificate"
        assert not (c.data_dir / "ca.key").exists(), "the key went through a leader that does not hold it"

        refused = phone.post("/control/v1/remove", {"node": "a"})
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "last_authority"

        token = join_token(phone)
        a.kill()  # the only authority: phone and c keep a majority, nobody can sign
        cfg = load_config(None).with_overrides(listen=f"127.0.0.1:{free_ports(4)}")
        with pytest.raises(StartupError, match="No authority member"):
            asyncio.run(join_mesh(DataDir(tmp_path / "d"), cfg, phone.address, token, "d", False))
    finally:
        kill_all(nodes)
