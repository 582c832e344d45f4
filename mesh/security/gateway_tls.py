"""HTTPS on the gateway's public port (mesh.toml `gateway.tls`), so prompts, API keys and the admin
credential need not cross a LAN in clear.

- "files": the operator's certificate and key (`gateway.tls_cert`, `gateway.tls_key`, PEM; relative
  paths are in the data dir), e.g. from their own CA or ACME.
- "mesh": a certificate from the mesh CA for this member's names (`gateway_names`), kept in the data
  dir as gateway.pem / gateway.key (0600), made again when missing, for other names, for another key,
  within RENEW_BEFORE_S of expiry, or once a CA rotation made another CA the signing one: at start, and
  while the member runs (MeshGatewayCertificate: hourly, and whenever this member's certificate or trusted
  CAs change). Clients trust the mesh CA (ca.pem, in every data
  dir and at GET /control/v1/ca). The request goes to a `Signer`: `local_signer` on an authority (it holds
  the CA key), else the daemon's signer that sends it to an authority over the peer port
  (mesh/security/authority.py; the request carries the key, the signer names the hosts).

With HTTPS on, the port speaks only TLS: a plain HTTP request fails its handshake and gets no answer.
No redirect: by the time a client could follow one, its API key has already crossed in clear, and a
redirect would teach it to keep doing so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from pathlib import Path
from typing import Callable

from mesh.core.errors import StartupError
from mesh.security.authority import NoAuthority
from mesh.security.own_cert import holds_from
from mesh.security.pki import (
    PkiError,
    certificate_names,
    expires_within,
    gateway_request,
    lifetime,
    new_key,
    server_only_context,
    sign_gateway_request,
)

log = logging.getLogger("quorum.gateway")

RENEW_BEFORE_S = 30 * 86400  # a mesh-issued gateway certificate (90 days) is renewed within 30 days of expiry
CERT_FILE, KEY_FILE = "gateway.pem", "gateway.key"

Signer = Callable[[bytes, tuple[str, ...]], bytes]  # (certificate request PEM, names) -> certificate PEM


def local_signer(ca_pem: bytes, ca_key: Callable[[], bytes]) -> Signer:
    """Signs with the CA key this member holds (`ca_key()` reads it when a certificate is needed)."""
    def sign(csr_pem: bytes, names: tuple[str, ...]) -> bytes:
        return sign_gateway_request(ca_pem, ca_key(), csr_pem, names)
    return sign


def gateway_names(advertise: str, listen_host: str, hostname: str | None = None) -> tuple[str, ...]:
    """The names a client may reach this member's gateway by: --advertise, the listen host (unless a
    wildcard), the host name and HOST.local (mDNS), localhost and the loopback addresses."""
    hostname = (socket.gethostname() if hostname is None else hostname).lower()
    short = hostname.split(".")[0]
    names = [advertise, listen_host, hostname, short, f"{short}.local" if short else "",
             "localhost", "127.0.0.1", "::1"]
    return tuple(dict.fromkeys(n.strip("[]").lower() for n in names if n and n not in ("0.0.0.0", "::")))


def mesh_certificate(data_dir: Path, ca_pem: bytes, names: tuple[str, ...], sign: Signer) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for the gateway: the stored one while it still fits, else a new one."""
    key_path, cert_path = data_dir / KEY_FILE, data_dir / CERT_FILE
    if not key_path.exists():
        _write_private(key_path, new_key())
    key = key_path.read_bytes()
    cert = cert_path.read_bytes() if cert_path.exists() else b""
    if cert and _still_good(cert, key, ca_pem, names):
        return cert, key
    cert = sign(gateway_request(key), names)
    cert_path.write_bytes(cert)
    return cert, key


def _still_good(cert: bytes, key: bytes, ca_pem: bytes, names: tuple[str, ...]) -> bool:
    try:
        return (holds_from(cert, key, ca_pem) and set(names) <= set(certificate_names(cert))
                and not expires_within(cert, RENEW_BEFORE_S))
    except ValueError:  # an unreadable stored certificate or key: make a new certificate
        return False


def gateway_context(mode: str, data_dir: Path, *, cert_file: str = "", key_file: str = "") -> ssl.SSLContext | None:
    """The public port's TLS context for `mode` "off" (None) or "files"; a StartupError says what is wrong. "mesh"
    is MeshGatewayCertificate's (it renews while the member runs)."""
    if mode == "off":
        return None
    if mode != "files":
        raise ValueError(f"gateway.tls = {mode!r}: MeshGatewayCertificate serves \"mesh\"")
    cert_path, key_path = data_dir / cert_file, data_dir / key_file  # an absolute path stays itself
    try:
        return server_only_context(cert_path.read_bytes(), key_path.read_bytes())
    except OSError as exc:
        raise StartupError(f"gateway.tls_cert / gateway.tls_key: cannot read {exc.filename}: {exc.strerror}") \
            from None
    except ssl.SSLError as exc:
        raise StartupError(f"gateway.tls_cert / gateway.tls_key: {cert_path} and {key_path} are not a PEM "
                           f"certificate and its key ({exc.reason or exc})") from None


class MeshGatewayCertificate:
    """gateway.tls = "mesh" while the member runs: the certificate is made again once it no longer fits (within
    RENEW_BEFORE_S of expiry, other names, or not from the signing CA after a CA rotation) and served from the
    next handshake on (the context's SNI callback, which runs for every ClientHello, switches to it)."""

    def __init__(self, data_dir: Path, ca_pem: Callable[[], bytes], names: tuple[str, ...], sign: Signer) -> None:
        self.data_dir, self.ca_pem, self.names, self.sign = data_dir, ca_pem, names, sign
        self._cert = b""
        self._serving: ssl.SSLContext | None = None

    def context(self) -> ssl.SSLContext:
        """The public port's context (blocking: it may have a certificate signed); StartupError if none."""
        try:
            cert, key = mesh_certificate(self.data_dir, self.ca_pem(), self.names, self.sign)
        except (OSError, PkiError) as exc:
            raise StartupError(f"gateway.tls = \"mesh\": no certificate for the gateway: {exc}") from None
        self._cert, self._serving = cert, server_only_context(cert, key)
        base = server_only_context(cert, key)
        base.sni_callback = self._switch
        return base

    def _switch(self, ssl_object: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        ssl_object.context = self._serving

    def refresh(self) -> bool:
        """Makes a new certificate if the stored one no longer fits (blocking); whether it did. Raises PkiError,
        OSError."""
        cert, key = mesh_certificate(self.data_dir, self.ca_pem(), self.names, self.sign)
        if cert == self._cert:
            return False
        self._cert, self._serving = cert, server_only_context(cert, key)
        log.info("the gateway's HTTPS certificate was made again (valid until %s)",
                 time.strftime("%Y-%m-%d", time.gmtime(lifetime(cert)[1])))
        return True

    async def run(self, changed: asyncio.Event, every_s: float = 3600.0) -> None:
        """Checks every `every_s` and whenever `changed` is set (this member's certificate or trusted CAs)."""
        wait = every_s
        while True:
            try:
                await asyncio.wait_for(changed.wait(), wait)
            except TimeoutError:
                pass  # the periodic check
            changed.clear()
            wait = every_s
            try:
                await asyncio.to_thread(self.refresh)
            except (PkiError, NoAuthority, OSError, ValueError, KeyError) as exc:  # the current one still serves:
                # retried in a minute (no authority reachable, or one that refused this member's certificate)
                log.warning("could not renew the gateway's HTTPS certificate: %s", exc)
                wait = min(every_s, 60.0)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
