"""CA rotation (issue 14, "removal revokes"): the trust-set rules of raft/apply_trust.py, and TrustKeeper
(mesh/security/ca_rotation.py) moving three members through a rotation over real certificates, a real
renewal and real TLS handshakes, with the log played by raft.state.apply."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl

import pytest

from mesh.security.authority import Authority
from mesh.security.ca_rotation import TrustKeeper, trust_bundle
from mesh.security.datadir import DataDir
from mesh.security.pki import (
    NodeIdentity,
    create_ca,
    fingerprint,
    issue_node_certificate,
    issuer_of,
    make_bundle,
    split_bundle,
)
from mesh.security.renewal import LiveIdentity, Renewer
from raft import snapshot
from raft.commands import (
    InitMesh,
    RequestCaRotation,
    RetireCas,
    RotateCa,
    SetMemberCa,
    SetMemberState,
    decode,
    encode,
)
from raft.records import Member
from raft.state import MeshState, Rejected, apply
from raft.wire import proposer_may_send
from tests.tls_sessions import handshake as raft_handshake


@pytest.fixture(scope="module")
def cas():
    return create_ca("t"), create_ca("t", "next")


def mesh(*ids: str, authorities: tuple[str, ...] = ()) -> MeshState:
    state = apply(MeshState(), InitMesh("m1", "t", 1.0))
    members = {i: Member(i, f"name-{i}", "", f"127.0.0.1:{n}", {"device_class": "desktop"}, "active", 1.0,
                         authority=i in authorities) for n, i in enumerate(ids)}
    return dataclasses.replace(state, members=members)


def test_removing_an_authority_owes_a_rotation_and_removing_another_member_does_not():
    state = mesh("a", "b", "c", authorities=("a", "b"))
    assert not apply(state, SetMemberState("c", "gone")).ca_rotation_owed
    owed = apply(state, SetMemberState("b", "gone"))
    assert "name-b held the CA key" in owed.ca_rotation_owed
    assert apply(state, RequestCaRotation("suspected leak")).ca_rotation_owed == "suspected leak"


def test_a_rotation_is_made_only_when_owed_by_a_live_authority_and_only_once(cas):
    (old, _), (new, _) = cas
    state = mesh("a", "b", "c", authorities=("a", "b"))
    rotate = RotateCa("a", new.decode(), (old.decode(),))
    with pytest.raises(Rejected, match="no CA rotation is owed"):
        apply(state, rotate)
    owed = apply(state, SetMemberState("b", "gone"))
    with pytest.raises(Rejected, match="not an authority"):
        apply(owed, RotateCa("c", new.decode(), (old.decode(),)))
    with pytest.raises(Rejected, match="unknown member"):
        apply(owed, RotateCa("b", new.decode(), (old.decode(),)))  # the removed one
    with pytest.raises(Rejected, match="names the CAs trusted before"):
        apply(owed, RotateCa("a", new.decode()))
    with pytest.raises(Rejected, match="not a PEM"):
        apply(owed, RotateCa("a", "garbage", (old.decode(),)))
    done = apply(owed, rotate)
    assert [fp for fp, _ in done.trusted_cas] == [fingerprint(old), fingerprint(new)]
    assert done.signing_ca == fingerprint(new) and done.ca_made_by == "a" and not done.ca_rotation_owed
    with pytest.raises(Rejected, match="no CA rotation is owed"):  # the second authority of a race
        apply(done, RotateCa("a", create_ca("t", "x")[0].decode(), ()))


def test_with_no_live_authority_a_member_that_is_no_witness_makes_the_ca_and_becomes_one(cas):
    (old, _), (new, _) = cas
    state = apply(mesh("a", "b", authorities=("a",)), SetMemberState("a", "gone"))
    done = apply(state, RotateCa("b", new.decode(), (old.decode(),)))
    assert done.members["b"].authority and done.signing_ca == fingerprint(new)


def test_the_old_ca_is_retired_only_once_every_live_member_reports_the_new_one(cas):
    (old, _), (new, _) = cas
    state = apply(apply(mesh("a", "b", "c", authorities=("a", "b")), SetMemberState("b", "gone")),
                  RotateCa("a", new.decode(), (old.decode(),)))
    with pytest.raises(Rejected, match="not trusted"):
        apply(state, SetMemberCa("a", fingerprint(create_ca("x")[0]), fingerprint(new)))
    with pytest.raises(Rejected, match="43 characters"):
        apply(state, SetMemberCa("a", fingerprint(new)))  # what it trusts is part of the report
    state = apply(state, SetMemberCa("a", fingerprint(new), fingerprint(new)))
    with pytest.raises(Rejected, match="still on an older CA: name-c"):
        apply(state, RetireCas(fingerprint(new)))
    with pytest.raises(Rejected, match="only the CAs other than the signing one"):
        apply(state, RetireCas(fingerprint(old)))
    forced = apply(state, RetireCas(fingerprint(new), force=True))  # c is away: it never said it trusts new
    assert [fp for fp, _ in forced.trusted_cas] == [fingerprint(new)] and not forced.ca_finish
    renewing = apply(apply(state, SetMemberCa("c", fingerprint(old), fingerprint(new))),
                     RetireCas(fingerprint(new), force=True))  # c trusts it and is renewing: not dropped under it
    assert len(renewing.trusted_cas) == 2 and renewing.ca_finish
    done = apply(apply(state, SetMemberCa("c", fingerprint(new), fingerprint(new))), RetireCas(fingerprint(new)))
    assert done.trusted_cas == ((fingerprint(new), new.decode()),)
    assert trust_bundle(done) == new
    with pytest.raises(Rejected, match="no other CA"):
        apply(done, RetireCas(fingerprint(new)))


def test_the_trust_set_survives_the_wire_and_the_dump(cas):
    (old, _), (new, _) = cas
    for cmd in (RequestCaRotation("why"), RotateCa("a", new.decode(), (old.decode(),)), SetMemberCa("a", "x" * 43),
                RetireCas("f" * 43, force=True)):
        assert decode(encode(cmd)) == cmd
    state = apply(apply(mesh("a", "b", authorities=("a", "b")), SetMemberState("b", "gone")),
                  RotateCa("a", new.decode(), (old.decode(),)))
    back = snapshot.decode_dump(snapshot.encode_dump(state, (b"\x01", 9, 2), (b"\x01", 8, 2), []))[0]
    assert back.trusted_cas == state.trusted_cas and back.signing_ca == state.signing_ca


def test_only_a_member_itself_proposes_its_rotation_or_its_certificate_ca(cas):
    assert proposer_may_send("a", encode(RotateCa("a", cas[1][0].decode())))
    assert not proposer_may_send("c", encode(RotateCa("a", cas[1][0].decode())))
    assert not proposer_may_send("c", encode(SetMemberCa("a", "x" * 43)))


# -- three members through a rotation -------------------------------------------------------------

class Log:
    """The replicated state, applied in order (what Raft gives every member)."""

    def __init__(self, state: MeshState) -> None:
        self.state = state
        self.leader = "a"

    async def propose(self, cmd) -> dict:
        self.state = apply(self.state, cmd)
        return {}


def handshake(server: ssl.SSLContext, client: NodeIdentity, server_ca: bytes) -> bool:
    """A mutual-TLS handshake in memory: whether the server accepts `client`'s certificate (the client trusts
    `server_ca` too: only the server's decision is tested)."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    ctx = client.client_context()
    ctx.load_verify_locations(cadata=server_ca.decode())
    c = ctx.wrap_bio(c_in, c_out, server_side=False)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for obj in (c, s):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                return False
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    try:
        s.do_handshake()
        c.read(1)  # TLS 1.3: the client learns of a refused certificate only after its handshake
    except ssl.SSLWantReadError:
        return True
    except ssl.SSLError:
        return False
    return True


def test_three_members_rotate_and_the_removed_copy_of_the_old_key_opens_nothing(cas, tmp_path):
    (old, old_key), _ = cas
    state = mesh("a", "b", "c", authorities=("a", "b"))
    log = Log(state)
    members = {}
    for node_id in ("a", "b", "c"):
        dd = DataDir(tmp_path / node_id)
        dd.prepare()
        key, cert = issue_node_certificate(old, old_key, node_id)
        dd.write_identity(key, cert, old, old_key if node_id in "ab" else None)
        members[node_id] = dd
    lives = {n: LiveIdentity(dd.identity()) for n, dd in members.items()}
    server_a = lives["a"].server_context()  # a peer port that follows the trusted CAs
    authorities = {n: Authority(n, (lambda n=n: lives[n]().ca_pem), members[n].ca_key, lambda: log.state, list,
                                lambda: None) for n in lives}
    # c's renewal is signed by a (what /control/v1/sign does there): a's key, c's id
    signer_for_c = Authority("c", lambda: lives["a"]().ca_pem, members["a"].ca_key, lambda: log.state, list,
                             lambda: None)
    renewers = {n: Renewer(lives[n], members[n].path, n, (signer_for_c if n == "c" else authorities["a"]).sign)
                for n in lives}
    woken: set[str] = set()

    async def fetch_key(maker: Member) -> bytes:
        return authorities[maker.node_id].signing_key()

    keepers = {n: TrustKeeper(n, members[n], lives[n], lambda: log.state, lambda: log.leader, log.propose,
                              lambda m: True, fetch_key, lambda n=n: woken.add(n)) for n in ("a", "c")}
    stolen = NodeIdentity(*issue_node_certificate(old, old_key, "c"), old)  # minted with b's copy of ca.key

    async def go() -> None:
        await log.propose(SetMemberState("b", "gone"))
        for _ in range(10):  # a bounded number of passes: each member moves one step per pass
            for node_id, keeper in keepers.items():
                await keeper.check()
                if node_id in woken:
                    woken.discard(node_id)
                    await renewers[node_id].renew()
            if len(log.state.trusted_cas) == 1:
                break
            # both CAs trusted during the cross-over: nobody is cut off
            assert handshake(server_a, stolen, lives["a"]().ca_pem)
        for keeper in keepers.values():  # the retirement applied: every member follows it
            await keeper.check()

    asyncio.run(go())
    new = log.state.signing_ca
    assert [fp for fp, _ in log.state.trusted_cas] == [new] and new != fingerprint(old)
    assert log.state.ca_made_by == "a" and members["a"].next_ca() is None
    for node_id in ("a", "c"):
        identity = lives[node_id]()
        assert [fingerprint(c) for c in split_bundle(identity.ca_pem)] == [new]
        assert issuer_of(identity.cert_pem, identity.ca_pem) == new
        assert log.state.members[node_id].ca == new
        assert (members[node_id].path / "ca.pem").read_bytes() == identity.ca_pem
    assert authorities["a"].signing_key() is not None  # the new key, installed
    now = lives["a"]().ca_pem
    assert handshake(server_a, lives["c"](), now)  # the renewed member is served
    assert not handshake(server_a, stolen, now)  # the old CA's certificate is refused at the handshake
    assert not handshake(lives["a"]().server_context(), stolen, now)


def test_an_authority_that_did_not_rotate_fetches_the_new_key_and_never_signs_with_the_old(cas, tmp_path):
    (old, old_key), (new, new_key) = cas
    state = apply(apply(mesh("a", "b", "c", authorities=("a", "b")), RequestCaRotation("suspected leak")),
                  RotateCa("a", new.decode(), (old.decode(),)))
    log = Log(state)
    dd = DataDir(tmp_path / "b")
    dd.prepare()
    key, cert = issue_node_certificate(old, old_key, "b")
    dd.write_identity(key, cert, old, old_key)
    live = LiveIdentity(dd.identity())
    authority = Authority("b", lambda: live().ca_pem, dd.ca_key, lambda: log.state, list, lambda: None)
    asked: list[str] = []

    async def fetch_key(maker: Member) -> bytes:
        asked.append(maker.node_id)
        assert not authority.here()  # holds only the old key: signs nothing with it
        return new_key

    keeper = TrustKeeper("b", dd, live, lambda: log.state, lambda: "a", log.propose, lambda m: True, fetch_key,
                         lambda: None)
    asyncio.run(keeper.check())
    assert asked == ["a"] and dd.ca_key() == new_key and authority.here()
    assert split_bundle(live().ca_pem)[0] == new and len(split_bundle(live().ca_pem)) == 2


def test_the_gateways_https_certificate_is_made_again_under_the_new_ca_without_a_restart(cas, tmp_path):
    """gateway.tls = "mesh": after a rotation the running port serves a certificate from the new CA (clients
    that fetched the new ca.pem connect), with no restart."""
    from mesh.security.gateway_tls import MeshGatewayCertificate, local_signer

    (old, old_key), (new, new_key) = cas
    trusted = {"ca": old, "key": old_key}  # what this authority holds: before, then after the rotation
    gateway = MeshGatewayCertificate(tmp_path, lambda: trusted["ca"], ("localhost", "127.0.0.1"),
                                     lambda csr, names: local_signer(trusted["ca"], lambda: trusted["key"])(csr, names))

    async def connects(port: int, ca: bytes) -> bool:
        ctx = ssl.create_default_context(cadata=ca.decode())
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        except ssl.SSLCertVerificationError:
            return False
        writer.close()
        return True

    async def go() -> tuple[bool, bool, bool, bool]:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=gateway.context())
        port = server.sockets[0].getsockname()[1]
        async with server:
            before = (await connects(port, old), await connects(port, new))
            trusted.update(ca=make_bundle(new, [old]), key=new_key)  # the rotation: the new CA signs
            assert gateway.refresh() and not gateway.refresh()  # made once, then it fits
            return (*before, await connects(port, new), await connects(port, old))

    assert asyncio.run(go()) == (True, False, True, False)


def test_raft_connections_from_a_dropped_ca_close_at_their_next_read_and_the_others_stay(cas):
    """A connection made during the cross-over with a certificate of the old CA (the removed member's copy of
    its key) does not outlive the old CA: once the trust reloads without it, its next read fails."""
    from raft.tls import RaftTls, TlsSession

    (old, old_key), (new, new_key) = cas
    server_key, server_cert = issue_node_certificate(new, new_key, "a")
    both = make_bundle(new, [old])
    raft_tls = RaftTls.from_pem(server_cert, server_key, both)

    def connect(ca: bytes, ca_key: bytes, node_id: str) -> tuple[TlsSession, TlsSession]:
        key, cert = issue_node_certificate(ca, ca_key, node_id)
        client = TlsSession(RaftTls.from_pem(cert, key, both).client_context, server_side=False)
        server = TlsSession(raft_tls.server_context, server_side=True)
        raft_handshake(client, server)
        return client, server

    forged, honest = connect(old, old_key, "c"), connect(new, new_key, "d")
    raft_tls.reload(server_cert, server_key, new)  # the old CA retired
    for client, server in (forged, honest):
        server.incoming.write(client.encrypt(b"append_entries"))
    assert honest[1].read() == b"append_entries"
    with pytest.raises(ssl.SSLError, match="no longer trusts"):
        forged[1].read()


def rotating_a_and_c(cas, tmp_path) -> tuple["Log", DataDir]:
    """Members a (the authority that made the new CA) and c, mid-rotation; a's data dir still holds its old-CA
    certificate."""
    (old, old_key), (new, _) = cas
    log = Log(apply(apply(mesh("a", "c", authorities=("a",)), RequestCaRotation("drill")),
                    RotateCa("a", new.decode(), (old.decode(),))))
    dd = DataDir(tmp_path / "a")
    dd.prepare()
    key, cert = issue_node_certificate(old, old_key, "a")
    dd.write_identity(key, cert, old, None)
    return log, dd


def test_no_member_renews_under_the_new_ca_until_every_member_trusts_it(cas, tmp_path):
    """A member away during the rotation (a phone asleep) reaches the others when it returns only if they
    still present certificates it trusts: renewals wait until every live member reports the new CA trusted."""
    (old, old_key), (new, _) = cas
    log, dd = rotating_a_and_c(cas, tmp_path)
    asked: list[str] = []
    keeper = TrustKeeper("a", dd, LiveIdentity(dd.identity()), lambda: log.state, lambda: "a", log.propose,
                         lambda m: True, lambda m: b"", lambda: asked.append("renew"))
    asyncio.run(keeper.check())
    asyncio.run(keeper.check())
    assert log.state.members["a"].trusts == fingerprint(new) and log.state.members["a"].ca == fingerprint(old)
    assert asked == []  # c has not said it trusts the new CA
    asyncio.run(log.propose(SetMemberCa("c", fingerprint(old), fingerprint(new))))
    asyncio.run(keeper.check())
    asyncio.run(keeper.check())
    assert asked == ["renew"]  # once, however many checks follow


def test_an_operator_finishes_a_rotation_without_a_member_that_is_away(cas, tmp_path):
    """meshctl ca finish while c is away: a renews at once, and the leader drops the old CA once it has;
    c, which never learnt the new CA, is left behind (it joins again)."""
    (old, old_key), (new, new_key) = cas
    log, dd = rotating_a_and_c(cas, tmp_path)
    live = LiveIdentity(dd.identity())
    asked: list[str] = []
    keeper = TrustKeeper("a", dd, live, lambda: log.state, lambda: "a", log.propose, lambda m: True,
                         lambda m: b"", lambda: asked.append("renew"))
    asyncio.run(keeper.check())
    assert asked == []
    asyncio.run(log.propose(RetireCas(fingerprint(new), force=True)))  # what meshctl ca finish sends
    assert log.state.ca_finish and len(log.state.trusted_cas) == 2  # a has not renewed: nothing dropped under it
    asyncio.run(keeper.check())
    assert asked == ["renew"]
    key, cert = issue_node_certificate(new, new_key, "a")  # the renewal the renewer makes
    live.replace(NodeIdentity(key, cert, live().ca_pem))
    asyncio.run(keeper.check())  # reports its certificate
    asyncio.run(keeper.check())  # the leader retires the old CA
    assert [fp for fp, _ in log.state.trusted_cas] == [fingerprint(new)] and not log.state.ca_finish


def test_the_mesh_secret_of_an_older_data_dir_is_deleted_and_nothing_makes_a_new_one(tmp_path):
    """The retired mesh-wide secret (every member, removed ones included, held it): a data dir from before
    loses it at start (meshd's NodeDaemon calls retire_secret), overwritten first."""
    dd = DataDir(tmp_path)
    dd.prepare()
    (tmp_path / "mesh.secret").write_text("ab" * 32 + "\n")
    assert dd.retire_secret() and not (tmp_path / "mesh.secret").exists()
    assert not dd.retire_secret()
    assert not hasattr(dd, "secret") and not hasattr(dd, "write_secret")


def test_during_a_rotation_a_certificate_minted_with_the_stolen_old_key_gets_no_new_certificate_nor_key(cas):
    """The attacker: a removed authority with its copy of the old CA key, while the old CA is still trusted (a
    member is away). It mints a certificate for a live member's id (ids are public) and calls the peer port's
    /sign and /ca-key as that member. Once the member has recorded its certificate (SetMemberCa), only that
    very certificate counts: the forged one is refused; the member's own passes."""
    from types import SimpleNamespace

    from starlette.requests import Request

    from mesh.cluster.control_credentials import CredentialRoutes
    from mesh.core.errors import ApiError
    from mesh.security.peer_tls import PEER_CERT_KEY, PEER_KEY
    from raft.commands import SetMemberCa

    (old_pem, old_key), _ = cas
    _, real = issue_node_certificate(old_pem, old_key, "a")
    _, forged = issue_node_certificate(old_pem, old_key, "a")  # the thief's: same CA, same id, its own key
    state = apply(mesh("a", "b"), SetMemberCa("a", fingerprint(old_pem), fingerprint(old_pem), fingerprint(real)))
    assert state.members["a"].cert == fingerprint(real)
    routes = CredentialRoutes()
    routes.d = SimpleNamespace(raft=SimpleNamespace(state=state))

    def caller(cert_pem: bytes) -> Request:
        return Request({"type": "http", "headers": [], PEER_KEY: "a", PEER_CERT_KEY: fingerprint(cert_pem)})

    assert routes._peer_member(caller(real), "Certificates are signed for").node_id == "a"
    with pytest.raises(ApiError) as refused:
        routes._peer_member(caller(forged), "Certificates are signed for")
    assert refused.value.status == 403 and refused.value.code == "not_the_recorded_certificate"
    # A member that has not recorded one yet (just joined) is taken by its id, as before.
    fresh = CredentialRoutes()
    fresh.d = SimpleNamespace(raft=SimpleNamespace(state=mesh("a", "b")))
    assert fresh._peer_member(caller(forged), "Certificates are signed for").node_id == "a"


def test_a_joiner_given_the_ca_key_is_an_authority_from_its_addmember_and_its_removal_owes_a_rotation():
    """The join answer carries the CA key; the AddMember that records the joiner says so, so a device lost
    before its daemon first starts (and records SetAuthority) still starts a rotation when removed. A member's
    own re-announce cannot make it an authority."""
    from raft.commands import AddMember, CreateToken

    state = apply(apply(MeshState(), InitMesh("m1", "t", 1.0)),
                  AddMember("a", "a", "h:1", "h:2", {}, 1.0))
    state = apply(state, CreateToken("t1", "0" * 64, 1.0, 100.0))
    state = apply(state, AddMember("b", "b", "h:3", "h:4", {}, 2.0, token_id="t1", authority=True))
    assert state.members["b"].authority and not state.members["a"].authority
    assert apply(state, SetMemberState("b", "gone")).ca_rotation_owed
    again = apply(state, AddMember("a", "a", "h:5", "h:2", {}, 3.0, authority=True))  # a's own re-announce
    assert not again.members["a"].authority
    assert decode(encode(AddMember("b", "b", "h:3", "h:4", {}, 2.0, authority=True))).authority is True
