"""HTTPS on the gateway's public port (mesh/security/gateway_tls.py, pki.py), on real sockets with real
TLS: a certificate from the mesh CA for the member's names, answered by the real `openai` client that
trusts the mesh CA and by meshctl; refused by clients that do not trust it; plain HTTP gets nothing.

Hostile input tried here: a client that does not trust the mesh CA, plain HTTP to the HTTPS port, the
gateway's certificate presented as a member's client certificate on the peer port, an operator
certificate file that is missing or not a certificate.
"""

from __future__ import annotations

import asyncio
import ssl

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from mesh.cli import meshctl
from mesh.core.errors import StartupError
from mesh.security.gateway_tls import (
    CERT_FILE,
    MeshGatewayCertificate,
    gateway_context,
    gateway_names,
    local_signer,
    mesh_certificate,
)
from mesh.security.http_guard import ConnectionLimits, public_server
from mesh.security.pki import (
    NodeIdentity,
    certificate_names,
    create_ca,
    gateway_request,
    issue_node_certificate,
    new_key,
    sign_gateway_request,
)
from tests.asgi_serving import serving

HANDS_OFF = 10.0


@pytest.fixture(scope="module")
def ca():
    return create_ca("https test")


def completion(request):
    return JSONResponse({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "over TLS"}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})


APP = Starlette(routes=[Route("/v1/chat/completions", completion, methods=["POST"]),
                        Route("/control/v1/keys", lambda r: JSONResponse({"keys": []}))])


def serve_https(tls: ssl.SSLContext, check) -> None:
    """Runs the public server over `tls` on a free loopback port and calls the blocking `check(port)`
    in a thread (the clients under test are synchronous)."""
    async def main():
        await serving(public_server(APP, ConnectionLimits(), tls), lambda port: asyncio.to_thread(check, port))
    asyncio.run(main())


def mesh_tls(tmp_path, ca) -> ssl.SSLContext:
    ca_pem, ca_key = ca
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    return MeshGatewayCertificate(tmp_path, lambda: ca_pem, gateway_names("", "127.0.0.1", "box"),
                                  local_signer(ca_pem, lambda: ca_key)).context()


def test_the_gateway_names_are_the_advertised_and_local_ones():
    assert gateway_names("pi5.lan", "0.0.0.0", "pi5") == ("pi5.lan", "pi5", "pi5.local", "localhost", "127.0.0.1",
                                                          "::1")
    assert "192.168.1.20" in gateway_names("", "192.168.1.20", "x")


def test_the_real_openai_client_trusting_the_mesh_ca_is_answered_and_others_are_refused(tmp_path, ca):
    tls = mesh_tls(tmp_path, ca)
    ca_file = str(tmp_path / "ca.pem")

    def check(port):
        base = f"https://127.0.0.1:{port}/v1"
        trusted = openai.OpenAI(base_url=base, api_key="k", max_retries=0,
                                http_client=httpx.Client(verify=ssl.create_default_context(cafile=ca_file)))
        reply = trusted.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "over TLS"
        # By the name "localhost" too: the certificate names it.
        local = openai.OpenAI(base_url=f"https://localhost:{port}/v1", api_key="k", max_retries=0,
                              http_client=httpx.Client(verify=ssl.create_default_context(cafile=ca_file)))
        assert local.chat.completions.create(model="m", messages=[]).choices[0].message.content == "over TLS"
        # The system's trust store does not know the mesh CA: the handshake fails, nothing is sent.
        stranger = openai.OpenAI(base_url=base, api_key="k", max_retries=0, timeout=HANDS_OFF)
        with pytest.raises(openai.APIConnectionError) as refused:
            stranger.chat.completions.create(model="m", messages=[])
        assert "CERTIFICATE_VERIFY_FAILED" in repr(refused.value.__cause__)
        # Plain HTTP to the HTTPS port: no answer (a failed handshake), never a served request.
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={}, timeout=HANDS_OFF)
    serve_https(tls, check)


def test_meshctl_checks_the_gateway_against_the_mesh_ca(tmp_path, ca):
    tls = mesh_tls(tmp_path, ca)
    elsewhere = tmp_path / "no-member-here"
    elsewhere.mkdir()

    def check(port):
        def run(*args: str) -> str:
            return meshctl.run(meshctl.build_parser().parse_args(["--admin-token", "qadm1.x", *args]))
        assert run("--mesh", f"127.0.0.1:{port}", "--ca", str(tmp_path / "ca.pem"), "keys", "list", "--json") == "[]"
        assert run("--mesh", f"https://127.0.0.1:{port}", "--data-dir", str(tmp_path), "keys", "list") \
            .startswith("KEY ID")  # ca.pem from the member's data dir
        with pytest.raises(meshctl.MeshError, match="does not trust"):
            run("--mesh", f"https://127.0.0.1:{port}", "--data-dir", str(elsewhere), "keys", "list")
        with pytest.raises(meshctl.MeshError, match="use --mesh https://"):
            run("--mesh", f"127.0.0.1:{port}", "--data-dir", str(elsewhere), "keys", "list")
    serve_https(tls, check)


def test_the_stored_certificate_is_kept_while_it_fits_and_made_again_for_new_names(tmp_path, ca):
    ca_pem, ca_key = ca
    signed = []

    def sign(csr, names):
        signed.append(names)
        return sign_gateway_request(ca_pem, ca_key, csr, names)

    first, key = mesh_certificate(tmp_path, ca_pem, ("a.lan", "127.0.0.1"), sign)
    assert (tmp_path / "gateway.key").stat().st_mode & 0o077 == 0
    assert mesh_certificate(tmp_path, ca_pem, ("a.lan",), sign) == (first, key) and len(signed) == 1
    renamed, same_key = mesh_certificate(tmp_path, ca_pem, ("b.lan", "127.0.0.1"), sign)
    assert renamed != first and same_key == key and set(certificate_names(renamed)) == {"b.lan", "127.0.0.1"}
    (tmp_path / CERT_FILE).write_bytes(b"garbage")
    assert mesh_certificate(tmp_path, ca_pem, ("b.lan",), sign)[0] != b"garbage" and len(signed) == 3


def test_the_gateway_certificate_cannot_pass_for_a_member(tmp_path, ca):
    """It is for server authentication only: the peer port's TLS refuses it as a client certificate
    (the handshake fails on the server's side; a member's own certificate gets through)."""
    ca_pem, ca_key = ca
    key = new_key()
    gateway_cert = sign_gateway_request(ca_pem, ca_key, gateway_request(key), ("127.0.0.1",))
    leader_key, leader_cert = issue_node_certificate(ca_pem, ca_key, "leader")
    member_key, member_cert = issue_node_certificate(ca_pem, ca_key, "member")
    server_ctx = NodeIdentity(key_pem=leader_key, cert_pem=leader_cert, ca_pem=ca_pem).server_context()

    async def answer(client: NodeIdentity) -> bytes:
        async def handle(reader, writer):
            writer.write(b"served")
            await writer.drain()
            writer.close()
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client.client_context(),
                                                           server_hostname="quorum-node")
            try:
                return await asyncio.wait_for(reader.read(), HANDS_OFF)
            except (ssl.SSLError, ConnectionError):  # TLS 1.3: the server's alert comes after the client's handshake
                return b""
            finally:
                writer.close()
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(answer(NodeIdentity(key_pem=member_key, cert_pem=member_cert, ca_pem=ca_pem))) == b"served"
    assert asyncio.run(answer(NodeIdentity(key_pem=key, cert_pem=gateway_cert, ca_pem=ca_pem))) == b""


def test_operator_files_are_loaded_and_bad_ones_name_the_key(tmp_path, ca):
    ca_pem, ca_key = ca
    key = new_key()
    (tmp_path / "site.key").write_bytes(key)
    (tmp_path / "site.pem").write_bytes(sign_gateway_request(ca_pem, ca_key, gateway_request(key), ("gw.lan",)))
    assert isinstance(gateway_context("files", tmp_path, cert_file="site.pem", key_file="site.key"), ssl.SSLContext)
    assert gateway_context("off", tmp_path) is None
    with pytest.raises(StartupError, match="gateway.tls_cert"):
        gateway_context("files", tmp_path, cert_file="missing.pem", key_file="site.key")
    with pytest.raises(StartupError, match="gateway.tls_cert"):
        gateway_context("files", tmp_path, cert_file="site.key", key_file="site.key")
    with pytest.raises(StartupError, match="gateway.tls = \"mesh\""):
        MeshGatewayCertificate(tmp_path, lambda: ca_pem, ("x",), local_signer(ca_pem, lambda: (
            tmp_path / "ca.key").read_bytes())).context()  # this member holds no CA key
