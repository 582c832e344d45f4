"""mesh/cluster/discovery.py without the network: TXT records, candidate order and filtering, names, the
[discovery] section of mesh.toml, the join loop, and the `meshd join` flags."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from mesh.cli.meshd import build_parser
from mesh.cluster.discovery import (
    Advert,
    Candidate,
    advertised_addresses,
    encode_txt,
    instance_label,
    interfaces_for,
    join_first,
    order_candidates,
    parse_txt,
)
from mesh.core.config import ConfigError, DiscoveryConfig, NodeConfig, load_config
from tests.procs import REPO

MESH_A = "a" * 32
MESH_B = "b" * 32


def as_wire(txt: dict[str, str]) -> dict[bytes, bytes]:
    """TXT properties as zeroconf hands them to a browser."""
    return {k.encode(): v.encode() for k, v in txt.items()}


def test_txt_round_trip():
    advert = Advert(mesh_id=MESH_A, http_port=8080, name="pi-kitchen", ca="F" * 43)
    txt = encode_txt(advert)
    assert txt == {"v": "1", "mesh": MESH_A, "http": "8080", "name": "pi-kitchen", "ca": "F" * 43}
    assert parse_txt(as_wire(txt)) == advert
    assert parse_txt(txt) == advert  # str keys and values too


def test_txt_carries_no_secret():
    assert set(encode_txt(Advert(MESH_A, 1, "n", "F" * 43))) == {"v", "mesh", "http", "name", "ca"}


@pytest.mark.parametrize("change", [
    {"v": "2"},  # a future format is not guessed at
    {"v": None},
    {"mesh": ""},
    {"mesh": "has space"},
    {"mesh": "x" * 65},
    {"http": "0"},
    {"http": "65536"},
    {"http": "80a"},
    {"http": None},
])
def test_parse_txt_rejects_what_it_does_not_understand(change):
    txt = {"v": "1", "mesh": MESH_A, "http": "8080", "name": "n"} | change
    assert parse_txt({k: v for k, v in txt.items() if v is not None}) is None


def test_parse_txt_tolerates_a_missing_name_and_valueless_keys():
    assert parse_txt({b"v": b"1", b"mesh": MESH_A.encode(), b"http": b"9", b"extra": None}) == Advert(MESH_A, 9, "")


def cand(mesh: str, instance: str, host: str, port: int = 8080) -> Candidate:
    return Candidate(mesh_id=mesh, instance=instance, host=host, port=port)


def test_order_is_stable_whatever_order_answers_arrive_in():
    found = [cand(MESH_B, "zeta-1", "10.0.0.9", 9090), cand(MESH_A, "beta-2", "10.0.0.10"),
             cand(MESH_A, "Alpha-3", "10.0.0.2"), cand(MESH_A, "beta-2", "10.0.0.9")]
    expected = [("Alpha-3", "10.0.0.2"), ("beta-2", "10.0.0.9"), ("beta-2", "10.0.0.10"), ("zeta-1", "10.0.0.9")]
    for shuffled in (found, found[::-1], found[1:] + found[:1]):
        assert [(c.instance, c.host) for c in order_candidates(shuffled)] == expected


def test_order_filters_by_mesh_id_when_given():
    found = [cand(MESH_B, "b1", "10.0.0.1"), cand(MESH_A, "a1", "10.0.0.2"), cand(MESH_B, "b2", "10.0.0.3")]
    assert [c.instance for c in order_candidates(found, MESH_B)] == ["b1", "b2"]
    assert [c.instance for c in order_candidates(found, MESH_A)] == ["a1"]
    assert order_candidates(found, "c" * 32) == []
    assert len(order_candidates(found)) == 3  # no mesh id: members of any mesh


def test_order_filters_by_ca_fingerprint_when_given():
    found = [Candidate(MESH_A, "a1", "10.0.0.1", 8080, ca="A" * 43), Candidate(MESH_B, "b1", "10.0.0.2", 8080,
                                                                                ca="B" * 43)]
    assert [c.instance for c in order_candidates(found, ca="B" * 43)] == ["b1"]
    assert order_candidates(found, ca="C" * 43) == []


def test_order_drops_duplicate_addresses_and_non_addresses():
    found = [cand(MESH_A, "a1", "10.0.0.1"), cand(MESH_A, "a1", "10.0.0.1"), cand(MESH_A, "a2", "pi.local")]
    assert order_candidates(found) == [cand(MESH_A, "a1", "10.0.0.1")]


def test_order_puts_ipv4_first_and_brackets_ipv6():
    found = [cand(MESH_A, "a", "fd00::1", 9000), cand(MESH_A, "a", "192.168.1.4", 9000)]
    assert [c.address for c in order_candidates(found)] == ["192.168.1.4:9000", "[fd00::1]:9000"]


def test_instance_label_is_a_dns_label_unique_by_node_id():
    label = instance_label("Kitchen Pi / #2" + "x" * 80, "0123456789abcdef")
    assert label.startswith("Kitchen-Pi-2x") and label.endswith("-0123456789ab")
    assert len(label.encode()) <= 63
    assert instance_label("***", "0123456789ab") == "node-0123456789ab"


def test_interfaces_follow_the_listen_host():
    assert interfaces_for("127.0.0.1") == ["127.0.0.1"]
    assert interfaces_for("192.168.1.20") == ["192.168.1.20"]
    assert interfaces_for("0.0.0.0") is None  # every interface
    assert interfaces_for("::") is None


def test_advertised_addresses_prefer_advertise_then_listen_host():
    assert advertised_addresses(NodeConfig(listen="127.0.0.1:8080")) == ["127.0.0.1"]
    assert advertised_addresses(NodeConfig(listen="0.0.0.0:8080", advertise="10.1.2.3")) == ["10.1.2.3"]
    assert advertised_addresses(NodeConfig(listen="[::1]:8080")) == []  # IPv4 only
    wildcard = advertised_addresses(NodeConfig(listen="0.0.0.0:8080"))
    assert wildcard and all(a.count(".") == 3 for a in wildcard)


def test_join_first_tries_candidates_in_order_until_one_accepts():
    class Refused(Exception):
        pass

    tried = []

    async def join(address: str) -> str:
        tried.append(address)
        if address != "10.0.0.3:8080":
            raise Refused(f"{address} refused the join: HTTP 403")
        return "joined"

    found = order_candidates([cand(MESH_A, f"n{i}", f"10.0.0.{i}") for i in (4, 3, 1)])
    assert asyncio.run(join_first(found, join, Refused)) == "joined"
    assert tried == ["10.0.0.1:8080", "10.0.0.3:8080"]

    tried.clear()
    with pytest.raises(Refused) as info:
        asyncio.run(join_first(found[:1], join, Refused))
    assert "10.0.0.1:8080: 10.0.0.1:8080 refused" in str(info.value)


def test_discovery_section_defaults_and_values(tmp_path):
    assert load_config(None).discovery == DiscoveryConfig(advertise=True, service="_quorum._tcp.local.")
    path = tmp_path / "mesh.toml"
    path.write_text('[discovery]\nadvertise = false\nservice = "_q-test1._tcp.local."\n', encoding="utf-8")
    assert load_config(path).discovery == DiscoveryConfig(advertise=False, service="_q-test1._tcp.local.")


@pytest.mark.parametrize("line, key", [
    ('advertise = "yes"', "discovery.advertise"),
    ('service = "_quorum._udp.local."', "discovery.service"),
    ('service = "quorum._tcp.local."', "discovery.service"),
    ('service = "_quorum._tcp.local"', "discovery.service"),
    ('service = "_sixteen-chars-xx._tcp.local."', "discovery.service"),
    ('service = "_a--b._tcp.local."', "discovery.service"),
    ('service = "_-ab._tcp.local."', "discovery.service"),
    ('service = "_123._tcp.local."', "discovery.service"),
    ("interval = 3", "discovery.interval"),
])
def test_discovery_section_errors_name_the_key(tmp_path, line, key):
    path = tmp_path / "mesh.toml"
    path.write_text(f"[discovery]\n{line}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path)


def test_join_takes_exactly_one_of_peer_and_discover():
    parser = build_parser()
    args = parser.parse_args(["join", "--discover", "--token", "t"])
    assert args.discover and args.peer is None and args.discover_timeout == 5.0
    assert parser.parse_args(["join", "--peer", "h:1", "--discover-timeout", "2.5"]).discover_timeout == 2.5
    for bad in (["join"], ["join", "--peer", "h:1", "--discover"], ["join", "--discover", "--discover-timeout", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_importing_discovery_does_not_import_zeroconf():
    code = "import sys, mesh.cluster.discovery, mesh.cli.meshd; print('zeroconf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
