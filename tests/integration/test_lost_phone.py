"""A lost phone opens nothing (#14's acceptance), against real meshd processes (null backend) on loopback.

Three members: `a` (made the mesh: an authority), `b` (this machine's class, the reasoning replica) and
`phone`, started with TERMUX_VERSION set so that it profiles as a termux-phone (nodes/device_class.py rule
2): it never receives the CA key. The phone is removed and its process killed; an attacker holding a copy
of everything in its data dir (node.key, node.pem, ca.pem, admin.token, mesh.secret, node.json, the Raft
journal; no ca.key) and the token it joined with tries every door, while a client of `a` and `b` keeps
chatting. Doors tried, each refused:

- Raft: TLS to every member's Raft port with the phone's certificate, claiming its own and the others'
  addresses: the connection is closed;
- gRPC as client: Health on b's shard port with the phone's certificate: PERMISSION_DENIED;
- gRPC as server: a listener with the phone's certificate at an address a member dials for b: the
  member's own client (RemoteShard, which expects b's id) fails the handshake (the same dial expecting the
  phone's id gets through TLS: the refusal is the id check);
- the peer port, as client (status, a relayed chat, a certificate signing) and as server (a member's peer
  client dialling it for the leader): 403 / handshake refused;
- the control API with the phone's admin.token (on loopback and through the peer port): 401 / 403;
- the gateway with the admin.token and the old mesh secret as API keys: 401;
- a rejoin with the token the phone joined with (spent) and with a fresh data dir: refused.
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
from mesh.security.pki import NodeIdentity
from proto import mesh_pb2
from shards.types import NotReady
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


@pytest.fixture
def mesh(tmp_path, monkeypatch):
    nodes: dict[str, Meshd] = {}
    try:
        a = nodes["a"] = Meshd(tmp_path / "a", command="start", backend="null")
        a.data_dir.mkdir(parents=True)
        (a.data_dir / "mesh.toml").write_text(KEYS)
        a.init()
        a.start().wait_ready()
        tokens = {}
        for name in ("b", "phone"):
            tokens[name] = join_token(a)
            node = nodes[name] = Meshd(tmp_path / name, "--peer", a.address, "--token", tokens[name],
                                       command="join", backend="null")
            node.data_dir.mkdir(parents=True)
            (node.data_dir / "mesh.toml").write_text(KEYS)
            with monkeypatch.context() as env:
                if name == "phone":
                    env.setenv("TERMUX_VERSION", "0.118.0")  # profiles as a termux-phone
                node.start()
            wait_until(lambda n=node: n.health() == 200, 120, f"{name} to join")
        a.post("/control/v1/replicas", {"role": "reasoning", "count": 1}).raise_for_status()
        a.post("/control/v1/assign", {"role": "reasoning", "node": "b"}).raise_for_status()
        wait_until(lambda: ready_replicas(a) == ["b"], 120, "the replica on b")
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
    secret = (loot / "mesh.secret").read_text().strip()
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
            assert peer.post(f"{base}/control/v1/tokens", headers=auth, json={}).status_code == 403

        # The peer port as server: a's peer client, sent to the attacker's address as the leader's, refuses it.
        assert asyncio.run(impersonate_peer(stolen, identity(a), ids["a"]))

        # The control API and the gateway with what the phone held.
        for node in (a, b):
            for presented in (admin, secret):
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
