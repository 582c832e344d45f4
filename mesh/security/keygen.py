"""A member's new key and its certificate request, made by a short-lived child process.

Making them needs cryptography, and a Python process that imports it holds it (11.7 MB resident) until it ends: on
a witness, a quarter of its memory. A join and each renewal (every few weeks, or when a CA rotation asks) therefore
run `python -m mesh.security.keygen NAME` from the same interpreter, which prints the key and the request (for the
common name NAME) as one JSON line on a pipe only meshd reads, and ends. The certificate that comes back is checked
without cryptography too (mesh/security/own_cert.py: a TLS handshake in memory with that key).
"""

from __future__ import annotations

import json
import subprocess
import sys

from mesh.security.pki import PkiError, certificate_request, new_key

TIMEOUT_S = 120.0  # an interpreter start and one EC key; seconds on a router, bounded all the same


def key_and_request(name: str) -> tuple[bytes, bytes]:
    """(key PEM, certificate request PEM for the common name `name`), made in a child process (blocking: run it
    in a thread). PkiError when the child fails or answers anything else."""
    try:
        done = subprocess.run([sys.executable, "-m", "mesh.security.keygen", name], capture_output=True,
                              timeout=TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PkiError(f"making a new key failed: {exc}") from None
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise PkiError(f"making a new key failed: {why[0][:300]}")
    try:
        answer = json.loads(done.stdout)
        key, csr = answer["key"].encode(), answer["csr"].encode()
    except (ValueError, KeyError, TypeError, AttributeError):
        raise PkiError("making a new key failed: the key maker's answer is not a key and a request") from None
    if not key.startswith(b"-----BEGIN PRIVATE KEY-----") or not csr.startswith(b"-----BEGIN CERTIFICATE REQUEST"):
        raise PkiError("making a new key failed: the key maker's answer is not a key and a request")
    return key, csr


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m mesh.security.keygen NAME (prints a new key and its request as JSON)")
    key = new_key()
    sys.stdout.write(json.dumps({"key": key.decode(), "csr": certificate_request(key, args[0]).decode()}) + "\n")


if __name__ == "__main__":
    main()
