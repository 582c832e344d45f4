"""The CA stays home (#14 item 2), against real meshd processes (null backend) on loopback: a phone-class
member never receives the CA key; while it leads, a join is signed by the authority over the peer port;
with no authority reachable a join answers 503 with the reason; removing that last authority promotes a
member that may hold the key (#14 item 3): it makes a new CA, the mesh moves to it, and joins work again."""

from __future__ import annotations

import asyncio

import pytest

from mesh.core.config import load_config
from mesh.core.errors import StartupError
from mesh.node.bootstrap import join_mesh
from mesh.security.datadir import DataDir
from mesh.security.pki import fingerprint, issuer_of, split_bundle
from tests.procs import Meshd, free_ports, join_token, kill_all, wait_until


def leader_name(node: Meshd) -> str | None:
    return next((m["name"] for m in node.status()["members"] if m["leader"]), None)


def authorities(node: Meshd) -> set[str]:
    return {m["name"] for m in node.status()["members"] if m["authority"] and m["state"] != "gone"}


def transfer(node: Meshd, to: str) -> bool:
    reply = node.post("/control/v1/transfer", {"to": to})
    assert reply.status_code in (200, 503), reply.text  # 503: not caught up yet (retried), or no longer the leader
    return reply.status_code == 200


def move_leadership(nodes: dict[str, Meshd], leader: str, to: str) -> None:
    """Asks `leader` to hand leadership to `to` until `leader` sees `to` lead. A transfer answers once its
    request is sent; the election follows a few ms later, and from then on `leader` answers 503 not_leader:
    so each round looks before it asks (asking first, and looking only after a 200, missed the move whenever
    the election came after the first look: about 1 run in 10)."""
    def moved() -> bool:
        if leader_name(nodes[leader]) == to:
            return True
        transfer(nodes[leader], to)
        return leader_name(nodes[leader]) == to
    wait_until(moved, 30, f"{to} to lead")


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
        move_leadership(nodes, "a", "phone")

        c = nodes["c"] = Meshd(tmp_path / "c", "--peer", phone.address, "--token", join_token(a),
                               command="join", backend="null").start()
        wait_until(lambda: c.health() == 200, 120, "c to join through the phone")
        assert "signed a join certificate" in a.log(), "the authority did not sign c's certificate"
        assert not (c.data_dir / "ca.key").exists(), "the key went through a leader that does not hold it"

        token = join_token(phone)
        a.kill()  # the only authority: phone and c keep a majority, nobody can sign
        cfg = load_config(None).with_overrides(listen=f"127.0.0.1:{free_ports(4)}")
        with pytest.raises(StartupError, match="No authority member"):
            asyncio.run(join_mesh(DataDir(tmp_path / "d"), cfg, phone.address, token, "d", False))

        # Removing the last authority: c (desktop class) may hold the key, so it makes a new CA.
        old = fingerprint((c.data_dir / "ca.pem").read_bytes())
        removed = phone.post("/control/v1/remove", {"node": "a"})
        assert removed.status_code == 200 and "made by c" in removed.json()["warning"], removed.text
        wait_until(lambda: (c.data_dir / "ca.key").exists() and authorities(phone) == {"c"}, 60, "c promoted")
        new = fingerprint(phone.get_json("/control/v1/ca")["ca"].encode())
        assert new != old
        for node in (phone, c):  # on the new CA alone: the one a's copy of the key signed is dropped
            wait_until(lambda n=node: [fingerprint(p) for p in split_bundle((n.data_dir / "ca.pem").read_bytes())]
                       == [new] and issuer_of((n.data_dir / "node.pem").read_bytes(),
                                              (n.data_dir / "ca.pem").read_bytes()) == new, 60, f"{node.name} on it")
        cfg = load_config(None).with_overrides(listen=f"127.0.0.1:{free_ports(4)}")
        record = asyncio.run(join_mesh(DataDir(tmp_path / "e"), cfg, phone.address, join_token(phone), "e", False))
        assert record.joined and "signed a join certificate" in c.log()
    finally:
        kill_all(nodes)
