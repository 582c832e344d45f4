"""A lost phone opens nothing (#14's acceptance), against real meshd processes (null backend) on loopback.

Four members: `a` (made the mesh: an authority), `b` and `c` (this machine's class; `c` holds the
reasoning replica) and `phone`, started with TERMUX_VERSION set so that it profiles as a termux-phone
(nodes/device_class.py rule 2): it never receives the CA key. The phone is removed and its process
killed; an attacker holding a copy of everything in its data dir (node.key, node.pem, ca.pem, admin.token,
node.json, the Raft journal; no ca.key, and no mesh.secret any more) and the token it joined with tries every
door, while a client of `a` and `b` keeps chatting. Doors tried, each refused:

- Raft: TLS to every member's Raft port with the phone's certificate, claiming its own and the others'
  addresses: the connection is closed;
- gRPC as client: Health on b's shard port with the phone's certificate: PERMISSION_DENIED;
- gRPC as server: a listener with the phone's certificate at an address a member dials for b: the
  member's own client (RemoteShard, which expects b's id) fails the handshake (the same dial expecting the
  phone's id gets through TLS: the refusal is the id check);
- the peer port, as client (status, a relayed chat, a certificate signing, the CA key) and as server (a member's peer
  client dialling it for the leader): 403 / handshake refused;
- the control API with the phone's admin.token (on loopback and through the peer port): 401 / 403;
- the gateway with the admin.token as an API key: 401;
- a rejoin with the token the phone joined with (spent) and with a fresh data dir: refused.

Then `b`, an authority (desktop class: it received the CA key, as `c` did), is removed and killed while a
client chats through `a` and `c` (#14 item 4, removal revokes): the mesh rotates its CA (a new CA trusted beside
the old, every member renewed under it, the old one dropped: mesh/security/ca_rotation.py), the client sees no
failed request, and an attacker holding a copy of b's data dir mints a certificate for c's live id with b's
ca.key: Raft, gRPC and the peer port refuse it at the handshake, and the peer-port and gRPC connections it opened
with it before the removal, and kept open, serve nothing once the old CA is retired.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import threading

import grpc
import httpx
import openai
import pytest

from mesh.core.config import load_config
from mesh.core.errors import StartupError
from mesh.node.bootstrap import join_mesh
from mesh.replicas.remote_shard import RemoteShard
from mesh.security.datadir import DataDir
from mesh.security.grpc_tls import channel_credentials, server_credentials
from mesh.security.peer_tls import peer_client
from mesh.security.pki import NodeIdentity, fingerprint, issue_node_certificate, issuer_of, make_bundle, split_bundle
from proto import mesh_pb2
from shards.types import NotReady
from tests.integration.held_connections import HeldConnections
from tests.procs import Meshd, free_ports, join_token, kill_all, ready_replicas, wait_until
from tests.unit.raft_tls_mesh import closed_by_peer, tls_client, typed_frame

MODEL = "gemma-3-270m"
HEALTH = "/quorum.mesh.v1.Shard/Health"
KEYS = '[gateway]\napi_keys = "required"\n'


def identity(node: Meshd) -> NodeIdentity:
    d = node.data_dir
    return NodeIdentity((d / "node.key").read_bytes(), (d / "node.pem").read_bytes(), (d / "ca.pem").read_bytes())


def ports(node: Meshd) -> dict[str, str]:
    return {k: f"127.0.0.1:{node.port + i}" for i, k in enumerate(("http", "grpc", "raft", "peer"))}


class Client(threading.Thread):
    """Chats through `a` and `b` in turn until stopped; counts answers and failures."""

    def __init__(self, nodes: list[Meshd], key: str) -> None:
        super().__init__(daemon=True)
        self.clients = [openai.OpenAI(base_url=f"{n.base_url}/v1", api_key=key, max_retries=0, timeout=30)
                        for n in nodes]
        self.stop, self.served, self.failures = threading.Event(), 0, []

    def run(self) -> None:
        while not self.stop.is_set():
            client = self.clients[self.served % len(self.clients)]
            try:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4)
                self.served += 1
            except openai.OpenAIError as exc:  # counted: the test asserts there are none
                self.failures.append(repr(exc))
                self.served += 1


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """a (made the mesh), b and c (desktop class: authorities too), phone; the reasoning replica on c."""
    nodes: dict[str, Meshd] = {}
    tmp_path = tmp_path_factory.mktemp("mesh")
    try:
        a = nodes["a"] = Meshd(tmp_path / "a", command="start", backend="null")
        a.data_dir.mkdir(parents=True)
        (a.data_dir / "mesh.toml").write_text(KEYS)
        a.init()
        a.start().wait_ready()
        tokens = {}
        for name in ("b", "phone", "c"):
            tokens[name] = join_token(a)
            node = nodes[name] = Meshd(tmp_path / name, "--peer", a.address, "--token", tokens[name],
                                       command="join", backend="null")
            node.data_dir.mkdir(parents=True)
            (node.data_dir / "mesh.toml").write_text(KEYS)
            with pytest.MonkeyPatch.context() as env:
                if name == "phone":
                    env.setenv("TERMUX_VERSION", "0.118.0")  # profiles as a termux-phone
                node.start()
            wait_until(lambda n=node: n.health() == 200, 120, f"{name} to join")
        a.post("/control/v1/replicas", {"role": "reasoning", "count": 1}).raise_for_status()
        a.post("/control/v1/assign", {"role": "reasoning", "node": "c"}).raise_for_status()
        wait_until(lambda: ready_replicas(a) == ["c"], 120, "the replica on c")
        yield nodes, tokens
    finally:
        kill_all(nodes)


def test_a_removed_phones_copied_data_dir_opens_no_door(mesh, tmp_path):
    nodes, tokens = mesh
    a, b, phone = nodes["a"], nodes["b"], nodes["phone"]
    members = {m["name"]: m for m in a.status()["members"]}
    assert members["phone"]["profile"]["device_class"] == "termux-phone"
    assert (a.data_dir / "ca.key").exists() and not (phone.data_dir / "ca.key").exists(), "the CA key left home"
    wait_until(lambda: {m["name"]: m["authority"] for m in a.status()["members"]}.items() >= {("a", True),
               ("phone", False)}, 30, "a recorded as an authority, the phone not")
    ids = {name: m["node_id"] for name, m in members.items()}
    key = a.post("/control/v1/keys", {"name": "client"}).json()["key"]

    loot = tmp_path / "loot"
    shutil.copytree(phone.data_dir, loot)  # everything the lost phone holds
    stolen = identity(phone)
    admin = (loot / "admin.token").read_text().strip()
    assert not (loot / "mesh.secret").exists(), "the mesh secret is retired: nothing to steal"
    assert a.post("/control/v1/remove", {"node": "phone"}).status_code == 200
    phone.kill()
    wait_until(lambda: all(m["state"] == "gone" for n in (a, b) for m in n.status()["members"]
                           if m["name"] == "phone"), 30, "the removal everywhere")

    client = Client([a, b], key)
    client.start()
    wait_until(lambda: client.served >= 2, 30, "the client to be served")
    try:
        # Raft: every member closes the phone's connection, whichever address it claims.
        for target in (a, b):
            for claimed in (ports(phone)["raft"], ports(a)["raft"], ports(b)["raft"]):
                with tls_client(ports(target)["raft"], stolen.client_context()) as s:
                    s.sendall(typed_frame(claimed))
                    assert closed_by_peer(s, 10), f"{target.name} kept the phone's Raft connection ({claimed})"

        # gRPC as client.
        assert asyncio.run(grpc_health(ports(b)["grpc"], channel_credentials(stolen))) \
            == grpc.StatusCode.PERMISSION_DENIED

        # gRPC as server: a's own client, dialling the attacker's port for b, refuses it.
        assert asyncio.run(impersonate_shard(stolen, identity(a), ids["b"], ids["phone"]))

        # The peer port as client.
        with httpx.Client(verify=stolen.client_context(), timeout=10) as peer:
            base = f"https://{ports(a)['peer']}"
            auth = {"Authorization": f"Bearer {admin}"}
            assert peer.get(f"{base}/control/v1/status", headers=auth).status_code == 403
            assert peer.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                             json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}).status_code == 403
            assert peer.post(f"{base}/control/v1/sign", json={"kind": "node", "csr": "x"}).status_code == 403
            assert peer.post(f"{base}/control/v1/ca-key", json={}).status_code == 403
            assert peer.post(f"{base}/control/v1/tokens", headers=auth, json={}).status_code == 403

        # The peer port as server: a's peer client, sent to the attacker's address as the leader's, refuses it.
        assert asyncio.run(impersonate_peer(stolen, identity(a), ids["a"]))

        # The control API and the gateway with what the phone held.
        for node in (a, b):
            for presented in (admin,):
                auth = {"Authorization": f"Bearer {presented}"}
                assert httpx.post(f"{node.base_url}/control/v1/tokens", json={}, headers=auth,
                                  timeout=10).status_code in (401, 403)
                assert httpx.post(f"{node.base_url}/v1/chat/completions", headers=auth, timeout=10,
                                  json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
                                  ).status_code == 401

        # A rejoin with the token the phone joined with (spent).
        cfg = load_config(None).with_overrides(listen=f"127.0.0.1:{free_ports(4)}")
        with pytest.raises(StartupError, match="refused the join"):
            asyncio.run(join_mesh(DataDir(tmp_path / "rejoin"), cfg, a.address, tokens["phone"], "phone", False))
        assert client.served >= 4
    finally:
        client.stop.set()
        client.join(60)
    assert not client.failures, client.failures
    assert "phone" not in {m["name"] for m in a.status()["members"] if m["state"] != "gone"}


def on_ca(node: Meshd, fp: str) -> bool:
    """Whether `node` trusts exactly the CA `fp` and holds a certificate from it (its data dir)."""
    me = identity(node)
    return [fingerprint(c) for c in split_bundle(me.ca_pem)] == [fp] and issuer_of(me.cert_pem, me.ca_pem) == fp


def test_a_removed_authoritys_copy_of_the_ca_key_opens_no_door_once_the_ca_rotated(mesh, tmp_path):
    nodes, _ = mesh
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    wait_until(lambda: {m["name"] for m in a.status()["members"] if m["authority"] and m["state"] != "gone"}
               >= {"a", "b", "c"}, 60, "a, b and c recorded as authorities")
    ids = {m["name"]: m["node_id"] for m in a.status()["members"]}
    old = (a.data_dir / "ca.pem").read_bytes()
    loot = tmp_path / "loot"
    shutil.copytree(b.data_dir, loot)  # everything the lost machine holds, the CA key included
    assert (loot / "ca.key").exists()
    key = a.post("/control/v1/keys", {"name": "rotation client"}).json()["key"]
    # Before the removal, the thief opens connections to a as c, with a certificate b's ca.key mints, and holds them.
    held = HeldConnections(NodeIdentity(*issue_node_certificate(old, (loot / "ca.key").read_bytes(), ids["c"]), old),
                           ports(a)["peer"], ports(a)["grpc"])
    held.start()
    wait_until(lambda: held.peer and held.grpc, 30, "the thief's connections to be open")

    client = Client([a, c], key)
    client.start()
    try:
        wait_until(lambda: client.served >= 2, 30, "the client to be served")
        removed = a.post("/control/v1/remove", {"node": "b"})
        assert removed.status_code == 200 and "rotates to a new CA" in removed.json()["warning"], removed.text
        b.kill()
        new = wait_until(lambda: next((fp for fp in [fingerprint(a.get_json("/control/v1/ca")["ca"].encode())]
                                       if fp != fingerprint(old)), None), 30, "a new signing CA")
        wait_until(lambda: on_ca(a, new) and on_ca(c, new), 60, "a and c on the new CA alone")
        wait_until(lambda: len(c.get_json("/control/v1/ca")["trusted"]) == 1, 30, "the old CA dropped")
        wait_until(lambda: len(a.get_json("/control/v1/ca")["trusted"]) == 1, 30, "the old CA dropped on a")
        count = len(held.peer)
        wait_until(lambda: len(held.peer) > count + 1, 30, "the thief's next requests")
        served = client.served
        wait_until(lambda: client.served >= served + 2, 30, "the client to be served after the rotation")
    finally:
        client.stop.set()
        client.join(60)
        held.stop.set()
        held.join(60)
    assert not client.failures, client.failures
    # The thief's connections, opened before the removal, served it until the old CA was retired, then nothing;
    # one peer connection throughout (its client port), and no gRPC reconnect (that would fail its handshake).
    assert held.peer[0][0] == 200 and held.peer[-1][0] == 403, held.peer
    assert {port for _, port in held.peer} == {held.peer[0][1]} and set(held.peer) <= {(200, held.peer[0][1]),
                                                                                       (403, held.peer[0][1])}
    assert held.grpc[-1] == grpc.StatusCode.PERMISSION_DENIED and grpc.StatusCode.UNAVAILABLE not in held.grpc, \
        held.grpc
    assert held.grpc[0] == grpc.StatusCode.OK, held.grpc

    # The attacker: b's copy of the old CA key signs a certificate for c's live id. It trusts every CA the
    # mesh ever had (/control/v1/ca is public), so what is tested is the members' refusal.
    stolen_key, cert = issue_node_certificate(old, (loot / "ca.key").read_bytes(), ids["c"])
    forged = NodeIdentity(stolen_key, cert, make_bundle(a.get_json("/control/v1/ca")["ca"].encode(), [old]))
    for target in (a, c):  # Raft
        try:
            with tls_client(ports(target)["raft"], forged.client_context()) as s:
                s.sendall(typed_frame(ports(c)["raft"]))
                assert closed_by_peer(s, 10), f"{target.name} kept a Raft connection from the old CA"
        except ssl.SSLError:
            pass  # refused during the handshake
    # gRPC: the handshake fails (UNAVAILABLE), not a call refused after it (c's id is live)
    assert asyncio.run(grpc_health(ports(c)["grpc"], channel_credentials(forged))) == grpc.StatusCode.UNAVAILABLE
    with httpx.Client(verify=forged.client_context(), timeout=10) as peer:  # the peer port: nothing signed for it
        with pytest.raises(httpx.TransportError):
            peer.post(f"https://{ports(a)['peer']}/control/v1/sign", json={"kind": "node", "csr": "x"})
    with httpx.Client(verify=identity(c).client_context(), timeout=10) as member:  # c's renewed certificate
        assert member.get(f"https://{ports(a)['peer']}/control/v1/ca").status_code == 200
    assert (a.data_dir / "ca.key").read_bytes() != (loot / "ca.key").read_bytes()
    # c, the authority that did not make the CA, fetched its key from the one that did (and holds no other)
    wait_until(lambda: (c.data_dir / "ca.key").read_bytes() == (a.data_dir / "ca.key").read_bytes(), 30,
               "c to hold the new CA key")
    assert "holds the new CA key" in c.log() or "this member's new CA signs" in c.log()


def test_an_operator_rotates_the_ca_with_meshctl(mesh):
    """`meshctl ca rotate` (a key suspected leaked): a new CA, every live member on it alone, requests served."""
    nodes, _ = mesh
    a, c = nodes["a"], nodes["c"]
    with pytest.raises(RuntimeError, match="No CA rotation is under way"):
        a.meshctl("ca", "finish")
    before = fingerprint(a.get_json("/control/v1/ca")["ca"].encode())
    assert "CA rotation requested" in a.meshctl("ca", "rotate", "--reason", "a drill")
    new = wait_until(lambda: next((fp for fp in [fingerprint(c.get_json("/control/v1/ca")["ca"].encode())]
                                   if fp != before), None), 30, "a new signing CA")
    wait_until(lambda: on_ca(a, new) and on_ca(c, new), 60, "a and c on the new CA alone")
    key = a.post("/control/v1/keys", {"name": "after the drill"}).json()["key"]
    reply = httpx.post(f"{a.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert reply.status_code == 200, reply.text


async def grpc_health(address: str, creds: grpc.ChannelCredentials) -> grpc.StatusCode:
    async with grpc.aio.secure_channel(address, creds, options=[("grpc.ssl_target_name_override",
                                                                  "quorum-node")]) as channel:
        call = channel.unary_unary(HEALTH, request_serializer=mesh_pb2.HealthRequest.SerializeToString,
                                   response_deserializer=mesh_pb2.HealthReply.FromString)
        try:
            await call(mesh_pb2.HealthRequest(), timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


async def impersonate_shard(stolen: NodeIdentity, member: NodeIdentity, victim_id: str, stolen_id: str) -> bool:
    """A gRPC server with the stolen certificate; True when a member's RemoteShard dialling it as `victim_id`
    fails its handshake (UNAVAILABLE), while dialling it as `stolen_id` completes TLS (the server then has no
    Health: UNIMPLEMENTED)."""
    server = grpc.aio.server()
    port = server.add_secure_port("127.0.0.1:0", server_credentials(stolen))
    await server.start()
    try:
        as_victim = RemoteShard(f"127.0.0.1:{port}", "reasoning", MODEL, victim_id,
                                credentials=channel_credentials(member))
        as_itself = RemoteShard(f"127.0.0.1:{port}", "reasoning", MODEL, stolen_id,
                                credentials=channel_credentials(member))
        outcomes = []
        for shard in (as_victim, as_itself):
            try:
                await shard.health(5.0)
                outcomes.append("OK")
            except NotReady as exc:  # every failed call: its message names the status code
                outcomes.append(str(exc))
        assert "UNIMPLEMENTED" in outcomes[1], f"dialled as the id its certificate names: {outcomes[1]}"
        refused = "UNAVAILABLE" in outcomes[0]
        await as_victim.close()
        await as_itself.close()
        return refused
    finally:
        await server.stop(0)


async def impersonate_peer(stolen: NodeIdentity, member: NodeIdentity, leader_id: str) -> bool:
    """An HTTPS listener with the stolen certificate, taken for the leader's peer port by a member's peer
    client: True when the client refuses it before sending the request."""
    got: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            got.append(await asyncio.wait_for(reader.read(100), 5))
        except (ssl.SSLError, ConnectionError, TimeoutError):  # the member aborted the handshake: expected
            pass
        writer.close()

    ctx = stolen.server_context()
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    async with server:
        async with peer_client(member, 10, expect=lambda address: leader_id) as client:
            try:
                await client.post(f"https://127.0.0.1:{port}/control/v1/status", json={})
                return False
            except httpx.ConnectError as exc:
                refused = "CERTIFICATE_VERIFY_FAILED" in str(exc) or "hostname" in str(exc).lower()
    return refused and not any(got)
