"""The mesh's defences, against real meshd processes on loopback: mutual TLS on gRPC, the HTTPS peer
port, join tokens (wrong, replayed, for another mesh), the admin credential, and no prompt in clear
between members (a packet capture on loopback, when the test may open a raw socket).

Hostile inputs tried here, one per test: gRPC without TLS, with TLS but no client certificate, with a
certificate from another mesh's CA, with a mesh-signed certificate of a node that is not a member, with
the certificate of a removed member, and with an undecodable message; joins with a made-up token, with a
token whose CA fingerprint is another mesh's, with a spent (replayed) token, and over plain HTTP; control
calls without or with a wrong admin credential; peer-port calls without a client certificate.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time

import grpc
import httpx
import openai
import pytest

from mesh.security.grpc_tls import TARGET_NAME_OPTION
from mesh.security.pki import create_ca, fingerprint, issue_node_certificate, trusting
from proto import mesh_pb2
from tests.procs import Meshd, kill_all, start_mesh, wait_until

MODEL = "gemma-3-270m"
HEALTH = "/quorum.mesh.v1.Shard/Health"
pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    nodes = start_mesh(tmp_path_factory.mktemp("sec"), ["a", "b", "c"], ["b"])
    try:
        yield nodes
    finally:
        kill_all(nodes)


def files(node: Meshd, *names: str) -> list[bytes]:
    return [(node.data_dir / name).read_bytes() for name in names]


def grpc_port(node: Meshd) -> str:
    return f"127.0.0.1:{node.port + 1}"


def peer_port(node: Meshd) -> str:
    return f"127.0.0.1:{node.port + 3}"


def health(address: str, creds: grpc.ChannelCredentials | None, raw: bytes | None = None) -> grpc.StatusCode:
    """The status of a Health call (OK, or the code it failed with)."""
    async def go() -> grpc.StatusCode:
        channel = (grpc.aio.insecure_channel(address) if creds is None
                   else grpc.aio.secure_channel(address, creds, options=[TARGET_NAME_OPTION]))
        async with channel:
            call = channel.unary_unary(HEALTH, request_serializer=lambda b: b,
                                       response_deserializer=mesh_pb2.HealthReply.FromString)
            try:
                await call(raw if raw is not None else mesh_pb2.HealthRequest().SerializeToString(), timeout=10)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK
    return asyncio.run(go())


def creds(ca: bytes, key: bytes | None = None, cert: bytes | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def test_grpc_needs_a_member_certificate_from_this_mesh(mesh):
    a, b = mesh["a"], mesh["b"]
    ca, ca_key = files(a, "ca.pem", "ca.key")
    key, cert = files(b, "node.key", "node.pem")
    target = grpc_port(b)
    assert health(target, creds(ca, key, cert)) == grpc.StatusCode.OK
    assert health(target, None) == grpc.StatusCode.UNAVAILABLE  # plain text: no handshake
    assert health(target, creds(ca)) == grpc.StatusCode.UNAVAILABLE  # TLS, no client certificate
    other_ca, other_key = create_ca("another mesh")
    foreign_key, foreign_cert = issue_node_certificate(other_ca, other_key, "intruder")
    assert health(target, creds(ca, foreign_key, foreign_cert)) == grpc.StatusCode.UNAVAILABLE
    # Signed by this mesh's CA, but the node id is no member's: refused call by call.
    stray_key, stray_cert = issue_node_certificate(ca, ca_key, "not-a-member")
    assert health(target, creds(ca, stray_key, stray_cert)) == grpc.StatusCode.PERMISSION_DENIED
    # A member with a malformed message: a clean INVALID_ARGUMENT, and the node still answers.
    assert health(target, creds(ca, key, cert), raw=b"\xff\xff\xff") == grpc.StatusCode.INVALID_ARGUMENT
    assert health(target, creds(ca, key, cert)) == grpc.StatusCode.OK


def test_control_api_needs_the_admin_credential(mesh):
    a = mesh["a"]
    assert httpx.get(f"{a.base_url}/control/v1/status", timeout=10).status_code == 401
    wrong = httpx.get(f"{a.base_url}/control/v1/status", headers={"Authorization": "Bearer qadm2.nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{a.base_url}/control/v1/status", headers=a.admin_headers(), timeout=10).status_code == 200
    # Each member holds its own credential (nothing derived from the mesh secret); the log records each,
    # so c's works on a too, and an operator's made with meshctl works everywhere until it is revoked.
    assert mesh["c"].admin_headers() != a.admin_headers()
    as_c = mesh["c"].admin_headers()
    assert httpx.get(f"{a.base_url}/control/v1/status", headers=as_c, timeout=10).status_code == 200
    ops = a.meshctl("admin", "create", "ops").strip()
    as_ops = {"Authorization": f"Bearer {ops}"}
    assert httpx.get(f"{mesh['c'].base_url}/control/v1/status", headers=as_ops, timeout=10).status_code == 200
    assert "ops" in a.meshctl("admin", "list")
    a.meshctl("admin", "revoke", "ops")
    assert httpx.get(f"{mesh['c'].base_url}/control/v1/status", headers=as_ops, timeout=10).status_code == 401
    assert httpx.get(f"{a.base_url}/control/v1/ca", timeout=10).status_code == 200  # the CA is public


def test_peer_port_serves_members_only(mesh):
    a, b = mesh["a"], mesh["b"]
    ca, key, cert = files(b, "ca.pem", "node.key", "node.pem")
    with httpx.Client(verify=trusting(ca), timeout=10) as anonymous:
        refused = anonymous.get(f"https://{peer_port(a)}/control/v1/status", headers=a.admin_headers())
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_a_member"
    member_ctx = trusting(ca)
    member_ctx.load_cert_chain(b.data_dir / "node.pem", b.data_dir / "node.key")
    with httpx.Client(verify=member_ctx, timeout=10) as member:
        assert member.get(f"https://{peer_port(a)}/control/v1/status").status_code == 401  # still needs admin
        assert member.get(f"https://{peer_port(a)}/control/v1/status", headers=a.admin_headers()).status_code == 200
    # Joins never travel in clear: the plain HTTP port refuses them.
    plain = httpx.post(f"{a.base_url}/control/v1/join", json={"token": "x"}, timeout=10)
    assert plain.status_code == 400


def join(root, a: Meshd, name: str, token: str) -> Meshd:
    return Meshd(root / name, "--peer", a.address, "--token", token, command="join", backend="null").start()


def test_bad_tokens_and_foreign_meshes_are_refused_and_removed_members_lose_grpc(mesh, tmp_path):
    a, b = mesh["a"], mesh["b"]
    good = a.post("/control/v1/tokens", {"ttl_s": 3600}).json()["token"]
    other_fp = fingerprint(create_ca("another mesh")[0])
    cases = {
        "made-up": "qjt1.000000000000." + "A" * 43 + "." + good.rsplit(".", 1)[1],
        "other-mesh": good.rsplit(".", 1)[0] + "." + other_fp,
    }
    for label, token in cases.items():
        n = join(tmp_path, a, label, token)
        try:
            assert n.proc.wait(timeout=60) == 1
            expected = "refused the join" if label == "made-up" else "does not match the token's fingerprint"
            assert expected in n.log(), n.log()
            assert not (n.data_dir / "node.pem").exists()
        finally:
            n.kill()
    d = join(tmp_path, a, "d", good)
    e = None
    try:
        wait_until(lambda: d.health() == 200, 120, "d to join")
        e = join(tmp_path, a, "e", good)  # the same token again: spent
        assert e.proc.wait(timeout=60) == 1 and "refused the join" in e.log()
        # d is removed: its certificate is still signed by the mesh CA, but gRPC refuses it, and its
        # admin.token no longer opens the control API (it could mint join tokens before).
        d.kill()
        assert a.post("/control/v1/remove", {"node": "d"}).status_code == 200
        stolen = d.admin_headers()
        assert stolen and httpx.post(f"{a.base_url}/control/v1/tokens", json={"ttl_s": 3600}, headers=stolen,
                                     timeout=10).status_code == 401
        ca = files(a, "ca.pem")[0]
        key, cert = files(d, "node.key", "node.pem")
        wait_until(lambda: health(grpc_port(b), creds(ca, key, cert)) == grpc.StatusCode.PERMISSION_DENIED, 30,
                   "b to refuse the removed member")
    finally:
        d.kill()
        if e is not None:
            e.kill()


class Capture:
    """Every TCP payload on the loopback interface while it runs, by (source port, destination port)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.2)
        self.flows: dict[tuple[int, int], bytearray] = {}
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            try:
                frame = self.sock.recv(65535)
            except TimeoutError:
                continue
            if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:  # IPv4 + TCP only
                continue
            ip = frame[14:]
            ihl = (ip[0] & 0x0F) * 4
            tcp = ip[ihl:]
            sport, dport = struct.unpack("!HH", tcp[:4])
            payload = tcp[(tcp[12] >> 4) * 4:]
            if payload:
                self.flows.setdefault((sport, dport), bytearray()).extend(payload)

    def stop(self) -> None:
        self.running = False
        self.thread.join(timeout=5)
        self.sock.close()


def test_no_prompt_crosses_between_members_in_clear(mesh):
    """c relays to the leader a (HTTPS peer port), a calls b's shard (gRPC, mutual TLS), the turn is
    logged through Raft (encrypted): the prompt must appear only on the client's own hop to c."""
    c = mesh["c"]
    try:
        capture = Capture()
    except PermissionError:
        pytest.skip("a raw socket on loopback needs root (CAP_NET_RAW)")
    secret = f"ZEBRA-QUASAR-{time.time_ns()}"
    try:
        client = openai.OpenAI(base_url=f"{c.base_url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Repeat this code: {secret}"}], max_tokens=8,
            temperature=0, extra_headers={"X-Session-Id": f"sec-{time.time_ns()}"})
        assert answer.choices[0].finish_reason in ("stop", "length")
    finally:
        capture.stop()
    needle = secret.encode()
    client_hop = {flow for flow in capture.flows if c.port in flow}
    assert any(needle in capture.flows[f] for f in client_hop), "the capture saw no clear text at all"
    leaks = [flow for flow, data in capture.flows.items() if flow not in client_hop and needle in data]
    assert not leaks, f"prompt in clear on loopback flows {leaks}"
    member_ports = {n.port + k for n in mesh.values() for k in (1, 2, 3)}
    assert any(set(flow) & member_ports for flow in capture.flows), "no traffic between members was captured"
