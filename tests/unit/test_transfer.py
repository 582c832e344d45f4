"""mesh/replicas/transfer.py fetch_model against shards/grpc_service.py NodeService over loopback gRPC: files
arrive intact, interrupted fetches resume, corrupt data is caught by sha256, peers without a
verified copy are skipped, and names that could leave the models directory are refused."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest

from mesh.replicas.transfer import fetch_model
from proto import mesh_pb2
from shards.grpc_service import CHUNK_BYTES, CLIENT_OPTIONS, REASON_KEY, NodeService
from shards.model_files import ModelFileError, is_verified, verify
from tests.grpc_serving import grpc_server

WAIT_S = 10.0
FILE = "tiny-model.gguf"
SIZE = 3 * CHUNK_BYTES + 12_345  # three whole chunks and a short one


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, WAIT_S))


@pytest.fixture(scope="module")
def content() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture()
def source(tmp_path: Path, content: bytes) -> tuple[Path, str]:
    """A peer's models directory holding FILE, verified and stamped; and its sha256."""
    models = tmp_path / "peer-models"
    models.mkdir()
    (models / FILE).write_bytes(content)
    sha256 = hashlib.sha256(content).hexdigest()
    verify(models / FILE, sha256, progress=False)
    return models, sha256


class CountingNodeService(NodeService):
    """NodeService that records the offsets asked for and the bytes sent, and can break the
    stream after `fail_after` chunks (as a peer that died mid-transfer)."""

    def __init__(self, models_dir: Path, fail_after: int | None = None) -> None:
        super().__init__(models_dir)
        self.fail_after = fail_after
        self.offsets: list[int] = []
        self.served = 0

    async def FetchModel(self, request, context):
        self.offsets.append(getattr(request, "offset", None))
        await super().FetchModel(request, _Tap(context, self))


class _Tap:
    def __init__(self, context, service: CountingNodeService) -> None:
        self._context = context
        self._service = service
        self._chunks = 0

    async def write(self, chunk) -> None:
        if self._service.fail_after is not None and self._chunks >= self._service.fail_after:
            await self._context.abort(grpc.StatusCode.UNAVAILABLE, "injected failure")
        await self._context.write(chunk)
        self._chunks += 1
        self._service.served += len(chunk.data)

    def __getattr__(self, name):
        return getattr(self._context, name)


@contextlib.asynccontextmanager
async def peer(service: NodeService) -> AsyncIterator[str]:
    async with grpc_server(service) as (_, address):
        yield address


def test_file_arrives_intact_and_stamped(tmp_path, source, content, caplog):
    models, sha256 = source
    service = CountingNodeService(models)
    dest = tmp_path / "models"

    async def main():
        async with peer(service) as address:
            return await fetch_model(address, FILE, sha256, dest)

    with caplog.at_level(logging.INFO, logger="quorum.transfer"):
        path = run(main())
    assert path == dest / FILE
    assert path.read_bytes() == content
    assert is_verified(path, sha256)
    assert not (dest / f"{FILE}.partial").exists()
    assert service.offsets == [0] and service.served == SIZE
    lines = [r.getMessage() for r in caplog.records if "%" in r.getMessage()]
    assert lines and lines[-1].startswith(f"fetching {FILE} from 127.0.0.1:") and "100% (3/3 MB)" in lines[-1]
    # Already there and verified: no network at all (the address is not even valid).
    assert run(fetch_model("127.0.0.1:1", FILE, sha256, dest)) == path


def test_interrupted_fetch_resumes_in_a_new_call(tmp_path, source, content):
    models, sha256 = source
    flaky = CountingNodeService(models, fail_after=1)
    healthy = CountingNodeService(models)
    dest = tmp_path / "models"

    async def main():
        async with peer(flaky) as address:
            with pytest.raises(ModelFileError, match="injected failure"):
                await fetch_model(address, FILE, sha256, dest, attempts=1)
        assert (dest / f"{FILE}.partial").stat().st_size == CHUNK_BYTES
        async with peer(healthy) as address:
            return await fetch_model(address, FILE, sha256, dest)

    path = run(main())
    assert path.read_bytes() == content
    assert healthy.offsets == [CHUNK_BYTES]
    assert healthy.served == SIZE - CHUNK_BYTES  # the start was not fetched again


def test_next_peer_resumes_where_a_failed_one_stopped(tmp_path, source, content):
    models, sha256 = source
    flaky = CountingNodeService(models, fail_after=2)
    healthy = CountingNodeService(models)
    dest = tmp_path / "models"

    async def main():
        async with peer(flaky) as first, peer(healthy) as second:
            return await fetch_model([first, second], FILE, sha256, dest)

    assert run(main()).read_bytes() == content
    assert flaky.offsets == [0] and healthy.offsets == [2 * CHUNK_BYTES]
    assert flaky.served + healthy.served == SIZE


def test_corrupt_partial_file_is_caught_deleted_and_fetched_again(tmp_path, source, content):
    models, sha256 = source
    service = CountingNodeService(models)
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / f"{FILE}.partial").write_bytes(b"\0" * CHUNK_BYTES)  # wrong bytes

    async def main():
        async with peer(service) as address:
            return await fetch_model(address, FILE, sha256, dest)

    path = run(main())
    assert path.read_bytes() == content
    assert is_verified(path, sha256)
    assert service.offsets == [CHUNK_BYTES, 0]  # resumed, failed the hash, started over
    assert not (dest / f"{FILE}.partial").exists()


def test_a_peer_whose_copy_is_not_verified_to_the_hash_is_refused(tmp_path, source, content):
    models, sha256 = source
    other = tmp_path / "other-models"
    other.mkdir()
    (other / FILE).write_bytes(content[::-1])  # a different file, verified to its own hash
    verify(other / FILE, hashlib.sha256(content[::-1]).hexdigest(), progress=False)
    wrong = CountingNodeService(other)
    right = CountingNodeService(models)
    dest = tmp_path / "models"

    async def main():
        async with peer(wrong) as first, peer(right) as second:
            async with grpc.aio.insecure_channel(first, options=CLIENT_OPTIONS) as channel:
                error = await _refusal(channel, FILE, sha256)
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert dict(error.trailing_metadata())[REASON_KEY] == "unverified"
            return await fetch_model([first, second], FILE, sha256, dest)

    assert run(main()).read_bytes() == content
    assert wrong.served == 0 and len(wrong.offsets) == 2
    assert right.offsets == [0] and right.served == SIZE


def test_fetch_fails_with_model_file_error_when_no_peer_has_it(tmp_path, source):
    models, sha256 = source
    dest = tmp_path / "models"

    async def main():
        async with peer(NodeService(models)) as address:
            with pytest.raises(ModelFileError, match="NOT_FOUND"):
                await fetch_model(address, "missing.gguf", sha256, dest)
            with pytest.raises(ModelFileError, match="not a plain model file name"):
                await fetch_model(address, "../escape.gguf", sha256, dest)

    run(main())
    assert not list(dest.glob("*"))


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "x\x00y", "..", "", ".hidden"])
def test_names_outside_the_models_directory_are_refused(tmp_path, source, name):
    models, sha256 = source

    async def main():
        async with peer(NodeService(models)) as address:
            async with grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS) as channel:
                error = await _refusal(channel, name, sha256)
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
                # ...and the same server still serves a good request.
                call = channel.unary_stream("/quorum.mesh.v1.Node/FetchModel",
                                            request_serializer=mesh_pb2.FetchModelRequest.SerializeToString,
                                            response_deserializer=mesh_pb2.ModelChunk.FromString)
                chunks = [c async for c in call(mesh_pb2.FetchModelRequest(file=FILE, sha256=sha256,
                                                                           offset=SIZE - 10))]
                assert [(c.offset, len(c.data), c.total_size) for c in chunks] == [(SIZE - 10, 10, SIZE)]

    run(main())


def test_offset_past_the_end_is_out_of_range(tmp_path, source):
    models, sha256 = source

    async def main():
        async with peer(NodeService(models)) as address:
            async with grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS) as channel:
                error = await _refusal(channel, FILE, sha256, offset=SIZE + 1)
                assert error.code() == grpc.StatusCode.OUT_OF_RANGE

    run(main())


async def _refusal(channel: grpc.aio.Channel, file: str, sha256: str, offset: int = 0) -> grpc.aio.AioRpcError:
    call = channel.unary_stream("/quorum.mesh.v1.Node/FetchModel",
                                request_serializer=mesh_pb2.FetchModelRequest.SerializeToString,
                                response_deserializer=mesh_pb2.ModelChunk.FromString)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call(mesh_pb2.FetchModelRequest(file=file, sha256=sha256, offset=offset)):
            pass
    return caught.value


def test_a_fetch_accepts_only_the_member_the_address_belongs_to(tmp_path, source, content):
    """With `expect` (the daemon's: the live member whose gRPC address it is), TLS takes only that member's
    certificate: another member's certificate at that address (a removed one posing as a model source)
    fails the handshake, and an address no live member has is not dialled."""
    from mesh.security.grpc_tls import channel_credentials, server_credentials
    from mesh.security.pki import NodeIdentity, create_ca, issue_node_certificate

    models, sha256 = source
    ca, ca_key = create_ca("t")
    source_member = NodeIdentity(*issue_node_certificate(ca, ca_key, "source"), ca)
    fetcher = NodeIdentity(*issue_node_certificate(ca, ca_key, "fetcher"), ca)

    async def main():
        server = grpc.aio.server()
        NodeService(models).add_to(server)
        port = server.add_secure_port("127.0.0.1:0", server_credentials(source_member))
        await server.start()
        address, creds = f"127.0.0.1:{port}", channel_credentials(fetcher)
        try:
            for who, dest in ((lambda a: "victim", "as-victim"), (lambda a: None, "nobody")):
                with pytest.raises(ModelFileError) as refused:
                    await fetch_model(address, FILE, sha256, tmp_path / dest, attempts=1, credentials=creds,
                                      expect=who)
                assert not (tmp_path / dest / FILE).exists()
                yield str(refused.value)
            yield await fetch_model(address, FILE, sha256, tmp_path / "ok", credentials=creds,
                                    expect=lambda a: "source")
        finally:
            await server.stop(0)

    async def collect():
        return [item async for item in main()]

    as_victim, nobody, path = run(collect())
    assert "UNAVAILABLE" in as_victim and "no live member" in nobody
    assert path.read_bytes() == content
