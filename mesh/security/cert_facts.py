"""What a member reads from certificates it holds itself, without the cryptography package: a strict DER reader
for the few facts it needs (validity, subject common name, subject alternative names).

A witness on a 256 MB router keeps cryptography (11.7 MB resident) out of its steady state: the renewal timer,
the node id of its own certificate and the gateway certificate's names come from here. Nothing here decides
whether a certificate is genuine: these are certificates of this member's own data dir, or ones a signature
check has accepted already (mesh/security/pki.py). The reader is strict all the same: definite minimal lengths,
every structure read to its end, anything unexpected a ValueError.
"""

from __future__ import annotations

import calendar
import ipaddress
from dataclasses import dataclass

_SEQUENCE, _SET, _INTEGER, _BIT_STRING, _OCTET_STRING, _OID, _BOOLEAN = 0x30, 0x31, 0x02, 0x03, 0x04, 0x06, 0x01
_VERSION, _ISSUER_UID, _SUBJECT_UID, _EXTENSIONS = 0xA0, 0x81, 0x82, 0xA3
_UTC_TIME, _GENERALIZED_TIME = 0x17, 0x18
_DNS_NAME, _IP_ADDRESS = 0x82, 0x87  # GeneralName [2] dNSName, [7] iPAddress (implicit)
_COMMON_NAME = bytes([0x55, 0x04, 0x03])  # 2.5.4.3
_SUBJECT_ALT_NAME = bytes([0x55, 0x1D, 0x11])  # 2.5.29.17
_STRINGS = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x14: "latin-1", 0x1E: "utf-16-be", 0x1C: "utf-32-be"}


@dataclass(frozen=True)
class CertFacts:
    not_before: float  # Unix time
    not_after: float
    common_name: str  # the subject's first common name, "" if none
    dns_names: tuple[str, ...]  # subject alternative names, in order
    ip_addresses: tuple[str, ...]


def read(der: bytes) -> CertFacts:
    """The facts of one DER X.509 certificate; ValueError if it is not one."""
    certificate = _only(_Reader(der), _SEQUENCE)
    tbs = _Reader(certificate.take(_SEQUENCE))
    certificate.take(_SEQUENCE)  # signatureAlgorithm
    certificate.take(_BIT_STRING)  # signatureValue
    certificate.end()
    if tbs.peek() == _VERSION:
        tbs.take(_VERSION)
    tbs.take(_INTEGER)  # serialNumber
    tbs.take(_SEQUENCE)  # signature
    tbs.take(_SEQUENCE)  # issuer
    validity = _Reader(tbs.take(_SEQUENCE))
    not_before, not_after = _time(validity), _time(validity)
    validity.end()
    subject = tbs.take(_SEQUENCE)
    tbs.take(_SEQUENCE)  # subjectPublicKeyInfo
    for optional in (_ISSUER_UID, _SUBJECT_UID):
        if tbs.peek() == optional:
            tbs.take(optional)
    alt_names = None
    if tbs.peek() == _EXTENSIONS:
        alt_names = _alt_names(_only(_Reader(tbs.take(_EXTENSIONS)), _SEQUENCE))
    tbs.end()
    dns, ips = _general_names(alt_names) if alt_names is not None else ((), ())
    return CertFacts(not_before, not_after, _common_name(subject), dns, ips)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def peek(self) -> int | None:
        return self.data[self.at] if self.at < len(self.data) else None

    def take(self, tag: int) -> bytes:
        """The contents of the next element, which must have this tag."""
        if self.peek() != tag or tag & 0x1F == 0x1F:  # the high-tag form: no certificate field of ours uses it
            raise ValueError(f"DER: expected tag {tag:#x}, found {self.peek()!r}")
        at = self.at + 1
        if at >= len(self.data):
            raise ValueError("DER: truncated length")
        first = self.data[at]
        at += 1
        if first < 0x80:
            length = first
        else:
            count = first & 0x7F
            if count == 0 or count > 4 or at + count > len(self.data):
                raise ValueError("DER: indefinite or oversized length")
            length = int.from_bytes(self.data[at:at + count], "big")
            if self.data[at] == 0 or length < 0x80:
                raise ValueError("DER: length not in its shortest form")
            at += count
        if at + length > len(self.data):
            raise ValueError("DER: element runs past its container")
        self.at = at + length
        return self.data[at:self.at]

    def end(self) -> None:
        if self.at != len(self.data):
            raise ValueError("DER: trailing bytes in a structure")


def _only(reader: _Reader, tag: int) -> _Reader:
    """The one element `reader` holds, to be read in turn."""
    inner = reader.take(tag)
    reader.end()
    return _Reader(inner)


def _time(reader: _Reader) -> float:
    if reader.peek() == _UTC_TIME:
        text, width = reader.take(_UTC_TIME).decode("ascii"), 2
    else:
        text, width = reader.take(_GENERALIZED_TIME).decode("ascii"), 4
    if len(text) != width + 11 or not text.endswith("Z") or not text[:-1].isdigit():
        raise ValueError(f"DER: not a DER time: {text!r}")
    year = int(text[:width])
    if width == 2:
        year += 1900 if year >= 50 else 2000  # RFC 5280 4.1.2.5.1
    month, day, hour, minute, second = (int(text[i:i + 2]) for i in range(width, width + 10, 2))
    if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1] and hour < 24 and minute < 60
            and second < 60):
        raise ValueError(f"DER: not a date: {text!r}")
    return float(calendar.timegm((year, month, day, hour, minute, second)))


def _common_name(name: bytes) -> str:
    """The value of the first common name in a Name (RDNs in order, attributes in order), or ""."""
    rdns, found = _Reader(name), None
    while rdns.peek() is not None:
        rdn = _Reader(rdns.take(_SET))
        while rdn.peek() is not None:
            attribute = _Reader(rdn.take(_SEQUENCE))
            oid = attribute.take(_OID)
            tag = attribute.peek()
            value = attribute.take(tag) if tag is not None else b""
            attribute.end()
            if oid == _COMMON_NAME and found is None:
                if tag not in _STRINGS:
                    raise ValueError("DER: a common name that is not a string")
                found = value.decode(_STRINGS[tag])
    return found or ""


def _alt_names(extensions: _Reader) -> bytes | None:
    """The value of the subjectAltName extension, None without one; ValueError when it is there twice."""
    found = None
    while extensions.peek() is not None:
        extension = _Reader(extensions.take(_SEQUENCE))
        oid = extension.take(_OID)
        if extension.peek() == _BOOLEAN:
            extension.take(_BOOLEAN)
        value = extension.take(_OCTET_STRING)
        extension.end()
        if oid == _SUBJECT_ALT_NAME:
            if found is not None:
                raise ValueError("DER: two subjectAltName extensions")
            found = value
    return found


def _general_names(value: bytes) -> tuple[tuple[str, ...], tuple[str, ...]]:
    names = _only(_Reader(value), _SEQUENCE)
    dns, ips = [], []
    while names.peek() is not None:
        tag = names.peek()
        body = names.take(tag)
        if tag == _DNS_NAME:
            dns.append(body.decode("ascii"))
        elif tag == _IP_ADDRESS:
            if len(body) not in (4, 16):
                raise ValueError("DER: an IP address name of neither 4 nor 16 bytes")
            ips.append(str(ipaddress.ip_address(body)))
    return tuple(dns), tuple(ips)
