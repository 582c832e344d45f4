"""Mutual TLS for the Raft port: one certificate per member, checked against the replicated member list.

Every Raft connection is TLS 1.3 with a certificate on both ends, signed by the mesh CA; the certificate's
common name is the member's node id. TLS runs sans-IO (ssl.SSLObject over two ssl.MemoryBIO) inside
raft/bounded_connection.py, driven by the same poller events as the plain framing, so the frame cap, the
per-address cap, the handshake deadline, the EMFILE back-off and the journal barrier hold as they are. With
TLS on, pysyncobj's Fernet (the password) is off: no mesh-wide secret guards the log (there is none).

Who may talk (`authorize(node_id, raft_address)`, checked by raft/transport.py):
- as client, once the TLS handshake is done, against the address this member dialled;
- as server, against the address the peer claims in its first message (pysyncobj's handshake), before any
  Raft message is taken;
- again on every established connection every `RECHECK_S` (a member removed while connected is dropped);
- when the trusted CAs change (`RaftTls.reload` after a CA rotation dropped one), an established connection
  whose peer's certificate no trusted CA signed is closed at its next read. A connection whose handshake trusted
  only CAs that are all still trusted needs no check of its own (OpenSSL verified its peer up to one of them); the
  others are checked with cryptography, imported only then (a witness does not hold it while idle).

The rule (`member_authorizer`, the default RaftNode uses with its own state):
- an id the replicated state knows as removed (MemberState.GONE, final: an id is never reused) is refused,
  always, whether or not this member has caught up;
- a member that has caught up with the log (pysyncobj's onReady) takes only a live member bound to exactly
  that Raft address in MeshState.members;
- bootstrapping: a member that has not caught up yet (a joiner with an empty state, a member restarting and
  replaying its log), or whose state names no live member yet (a mesh being created), takes any certificate
  the mesh CA signed that its state does not know as removed: its state cannot say who is a member yet, and
  refusing would leave it unable to reach the leader that would tell it. Once it has caught up, the re-check
  drops whatever the full rule refuses. pysyncobj still takes only addresses in its own Raft configuration
  (partners from the leader, or from the log). So the window is a joiner's or a restarting member's catch-up,
  and only for a removed member whose removal that member has not applied yet.
"""

from __future__ import annotations

import os
import ssl
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from raft.pem import cert_blocks, still_covers, trust_set
from raft.state import MeshState
from raft.vocab import MemberState

if TYPE_CHECKING:
    from cryptography import x509

RECHECK_S = 0.25  # how often established connections are checked against the state again
Authorize = Callable[[str, str], bool]


@dataclass(frozen=True)
class _Contexts:
    server: ssl.SSLContext
    client: ssl.SSLContext


@dataclass(frozen=True)
class RaftTls:
    """What the transport needs: the two contexts and who may talk. `authorize` None: RaftNode fills in
    `member_authorizer` over its own state. `reload` swaps both contexts at once for new ones (a renewed
    certificate): connections opened after it use them, open ones keep theirs. Copies made with
    dataclasses.replace share the swap."""
    box: list  # [_Contexts], replaced whole (one reference assignment: safe against the tick thread)
    authorize: Authorize | None = None

    @property
    def server_context(self) -> ssl.SSLContext:
        return self.box[0].server

    @property
    def client_context(self) -> ssl.SSLContext:
        return self.box[0].client

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes, ca_pem: bytes, authorize: Authorize | None = None) -> RaftTls:
        """Contexts presenting this member's certificate and trusting exactly the mesh CA (`ca_pem` may hold
        several certificates: the CAs trusted during a rotation), both ways."""
        box: list = []
        box.append(_contexts(cert_pem, key_pem, ca_pem, box))
        return cls(box, authorize)

    def reload(self, cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> None:
        """New connections present `cert_pem` and trust `ca_pem` from now on. Open connections whose peer's
        certificate no CA in `ca_pem` signed (a CA rotation dropped its CA) are closed at their next read."""
        self.box[0] = _contexts(cert_pem, key_pem, ca_pem, self.box)
        now = trust_set(ca_pem)
        with _LOCK:  # the tick thread adds sessions
            checked = [s for s in _SESSIONS if _FAMILY.get(s.context) is self.box and not s.revoked
                       and (s.resumed or not still_covers(_TRUSTED.get(s.context), now))]
        if checked:
            from cryptography import x509

            trusted = [x509.load_pem_x509_certificate(block) for block in cert_blocks(ca_pem)]
            for session in checked:
                if not any(_issued(session.peer_der, ca) for ca in trusted):
                    session.revoked = True


# Which RaftTls (its box) made a context, the CAs it trusts (raft/pem.py trust_set) and the established
# sessions: what `reload` checks again.
_FAMILY: weakref.WeakKeyDictionary[ssl.SSLContext, list] = weakref.WeakKeyDictionary()
_TRUSTED: weakref.WeakKeyDictionary[ssl.SSLContext, frozenset[bytes] | None] = weakref.WeakKeyDictionary()
_SESSIONS: weakref.WeakSet[TlsSession] = weakref.WeakSet()
_LOCK = threading.Lock()


def _issued(peer_der: bytes | None, ca: x509.Certificate) -> bool:
    """Whether `ca` signed the peer's certificate (cryptography: asked only once a CA may have been dropped)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    try:
        x509.load_der_x509_certificate(peer_der or b"").verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):  # another issuer, another key type, or no certificate
        return False
    return True


def _contexts(cert_pem: bytes, key_pem: bytes, ca_pem: bytes, box: list | None = None) -> _Contexts:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False  # members are named by node id and Raft address, checked by `authorize`
    server.num_tickets = 0  # no resumption: every connection presents its certificate (and saves the bytes)
    for ctx in (server, client):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=ca_pem.decode())
        load_chain(ctx, cert_pem, key_pem)
        if box is not None:
            with _LOCK:
                _FAMILY[ctx] = box
                _TRUSTED[ctx] = trust_set(ca_pem)
    return _Contexts(server, client)


def member_authorizer(state: Callable[[], MeshState], caught_up: Callable[[], bool]) -> Authorize:
    """The rule of this module's docstring over a member's replicated state."""
    def authorize(node_id: str, raft_address: str) -> bool:
        current = state()
        member = current.members.get(node_id)
        if member is not None and member.state == MemberState.GONE:
            return False
        if not caught_up() or not any(m.state != MemberState.GONE for m in current.members.values()):
            return True
        return member is not None and member.raft_address == raft_address
    return authorize


class TlsSession:
    """One connection's TLS, sans-IO: ciphertext in through `incoming`, out through `take()`."""

    def __init__(self, context: ssl.SSLContext, server_side: bool) -> None:
        self.incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self.incoming, self._outgoing, server_side=server_side)
        self.context = context
        self.established = False
        self.peer_id: str | None = None
        self.peer_der: bytes | None = None
        self.revoked = False  # its peer's CA is no longer trusted (RaftTls.reload): the next read fails
        self.resumed = False  # a resumed TLS session (none are offered: num_tickets 0), verified in another handshake

    def handshake(self) -> bool:
        """Advances the handshake; True once it is done. Raises ssl.SSLError (bad certificate, garbage)."""
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        self.peer_id = common_name(self._obj.getpeercert())
        if not self.peer_id:  # verified by the CA but naming nobody: not a member certificate
            raise ssl.SSLError("the peer's certificate has no common name")
        self.peer_der = self._obj.getpeercert(binary_form=True)
        self.resumed = self._obj.session_reused
        self.established = True
        with _LOCK:
            _SESSIONS.add(self)
        return True

    def read(self) -> bytes:
        """Every byte of plaintext the ciphertext fed so far holds. Raises ssl.SSLZeroReturnError when the
        peer closed TLS, ssl.SSLError on a bad record or once the peer's CA is no longer trusted."""
        if self.revoked:
            raise ssl.SSLError("the peer's certificate is from a CA the mesh no longer trusts")
        parts = []
        while True:
            try:
                data = self._obj.read(65536)
            except ssl.SSLWantReadError:
                return b"".join(parts)
            if not data:
                raise ssl.SSLZeroReturnError("the peer closed the TLS session")
            parts.append(data)

    def encrypt(self, data: bytes | bytearray) -> bytes:
        view = memoryview(data)
        while view:
            view = view[self._obj.write(view):]
        return self.take()

    def take(self) -> bytes:
        """Ciphertext waiting to go out (handshake, records, alerts)."""
        return self._outgoing.read()


def common_name(cert: dict | None) -> str | None:
    """The subject CN of a certificate ssl verified (getpeercert())."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def load_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    # ssl loads a key only from a file: a private temporary directory, removed once loaded.
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
        cert.write_bytes(cert_pem)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        ctx.load_cert_chain(cert, key)
