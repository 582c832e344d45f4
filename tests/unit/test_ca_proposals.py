"""What the log takes from a proposer about the mesh's CA (raft/apply_trust.py, raft/wire.py): every member
writes the trusted CAs into its ca.pem, so a compromised authority must not get a malformed CA there, and only a
member itself says whether it holds the CA key."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from mesh.security.pki import create_ca, fingerprint, issue_node_certificate
from raft.apply_trust import ca_fingerprint
from raft.commands import RequestCaRotation, RotateCa, SetAuthority, encode
from raft.state import Rejected, apply
from raft.wire import proposer_may_send
from tests.unit.test_ca_rotation import mesh


@pytest.fixture(scope="module")
def cas():
    return create_ca("t"), create_ca("t", "next")


def bad_cas(cas) -> dict[str, str]:
    """What a compromised authority might propose as its new CA, and the reason each is refused."""
    (old, old_key), (new, _) = cas

    def made(subject: str, key, signer=None, issuer: str | None = None, ca: bool | None = True) -> str:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (x509.CertificateBuilder().subject_name(name).public_key(key.public_key())
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer or subject)]))
                   .serial_number(7).not_valid_before(datetime.datetime(2026, 1, 1))
                   .not_valid_after(datetime.datetime(2046, 1, 1)))
        if ca is not None:
            builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        return builder.sign(signer or key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()

    ec_key = ec.generate_private_key(ec.SECP256R1())
    other = serialization.load_pem_private_key(old_key, None)
    return {
        "two certificates": (new + old).decode(),
        "junk after it": new.decode() + "and more",
        "not base64": "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n",
        "not a certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "a member's certificate": issue_node_certificate(old, old_key, "z")[1].decode(),
        "no basicConstraints": made("no constraints", ec_key, ca=None),
        "CA=false": made("leaf", ec_key, ca=False),
        "signed by another CA": made("Quorum mesh CA t", ec_key, signer=other, issuer="Quorum mesh CA t"),
        "issuer is another": made("mine", ec_key, issuer="someone else"),
        "RSA 1024": made("weak", rsa.generate_private_key(65537, 1024)),
        "EC P-521": made("odd curve", ec.generate_private_key(ec.SECP521R1())),
    }


REASONS = {
    "two certificates": "one PEM certificate block and nothing else", "junk after it": "nothing else",
    "not base64": "not a DER X.509", "not a certificate": "not a DER X.509",
    "a member's certificate": "CA=false", "no basicConstraints": "no basicConstraints",
    "CA=false": "CA=false", "signed by another CA": "does not verify with its own key",
    "issuer is another": "issuer is not its subject", "RSA 1024": "RSA of 2048", "EC P-521": "EC P-256 or P-384",
}


def test_a_malformed_ca_proposed_by_a_compromised_authority_is_refused_with_its_reason(cas):
    """Every member writes the trusted CAs into its ca.pem: the apply handler (the same verdict on every member,
    from the bytes alone) refuses anything but one self-signed CA certificate with a key of ours."""
    (old, _), (new, _) = cas
    owed = apply(mesh("a", "b", authorities=("a",)), RequestCaRotation("drill"))
    for what, pem in bad_cas(cas).items():
        with pytest.raises(Rejected, match=REASONS[what]):
            apply(owed, RotateCa("a", pem, (old.decode(),)))
        with pytest.raises(Rejected, match=REASONS[what]):  # the first rotation's adopted CAs are checked too
            apply(owed, RotateCa("a", new.decode(), (pem,)))
    p384 = create_ca("t", "p384")[0]  # meshd makes P-256; P-384 is accepted as well
    assert apply(owed, RotateCa("a", new.decode().replace("\n", "\r\n"), (old.decode(),))).signing_ca == \
        fingerprint(new)
    assert ca_fingerprint(p384.decode()) == fingerprint(p384)


def test_only_a_member_itself_says_whether_it_holds_the_ca_key():
    """SetAuthority is an own-record command: a member clearing another authority's flag would make that one's
    removal owe no rotation (its copy of the CA key would stay trusted)."""
    assert proposer_may_send("a", encode(SetAuthority("a", True)))
    assert not proposer_may_send("c", encode(SetAuthority("a", False)))
    assert not proposer_may_send("c", encode(SetAuthority("a", True)))
