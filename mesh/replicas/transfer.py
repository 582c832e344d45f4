"""Fetching a model file from peers that hold it verified (their NodeService.FetchModel).

The file is written to `<file>.partial` beside its final place and only renamed into place once
its sha256 matches, so a half-fetched or corrupt file is never mistaken for a model. An
interrupted fetch resumes from the partial file's size (on the same or another peer: every peer
serves only a file it verified to the same sha256). One fetch per file at a time: callers must
not fetch the same file twice concurrently into one models_dir.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import grpc
from tqdm import tqdm

from mesh.security.grpc_tls import TARGET_NAME_OPTION, target_for
from proto import mesh_pb2
from shards.grpc_service import TRANSFER_OPTIONS
from shards.model_files import ModelFileError, is_verified, model_path

log = logging.getLogger("quorum.transfer")

FETCH_MODEL = "/quorum.mesh.v1.Node/FetchModel"
_BLOCK = 1 << 20
# Answers that will not change by asking the same peer again.
_PERMANENT = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED,
              grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


class _PeerFailed(Exception):
    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent  # do not ask this peer again during this fetch


async def fetch_model(address: str | Sequence[str], file: str, sha256: str, models_dir: Path,
                      progress: bool = False, attempts: int = 3, *,
                      credentials: grpc.ChannelCredentials | None = None,
                      backoff_s: float = 0.5,
                      on_progress: Callable[[str, int, int], None] | None = None,
                      expect: Callable[[str], str | None] | None = None) -> Path:
    """Downloads `file` into `models_dir` from a peer (host:port) or the first of several peers
    that can serve it, verifies its sha256, stamps it, and returns its path.

    `address` is one peer or a list tried in order: a peer that fails (unreachable, stream
    broken, file missing or not verified there) hands over to the next, which resumes the partial
    file. A file whose sha256 does not match is deleted and fetched again from zero, starting
    with the next peer. `attempts` bounds the rounds over the peers (each round ends at a
    complete file or when every peer has failed; rounds that made no file wait backoff_s, then
    twice that, ...). Peers that answered NOT_FOUND, FAILED_PRECONDITION and the like are not
    asked again. Raises ModelFileError when no round gives a verified file. A file already
    present and stamped with `sha256` is returned without any network traffic.
    `on_progress(peer, done_bytes, total_bytes)` is called at every ~10% of the file.
    `expect(address)` -> node id: TLS accepts only that member's certificate at that address (None: no live
    member there, not asked); without it, any member's (tools, tests).
    """
    sha256 = sha256.lower()
    path = model_path(Path(models_dir), file)
    if await asyncio.to_thread(is_verified, path, sha256):
        return path
    peers = [address] if isinstance(address, str) else list(address)
    if not peers:
        raise ValueError("fetch_model needs at least one peer address")
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1; got {attempts}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    errors: list[str] = []
    for attempt in range(1, attempts + 1):
        for i, peer in enumerate(list(peers)):
            try:
                await _download(peer, file, sha256, partial, credentials, progress, on_progress, expect)
            except _PeerFailed as exc:
                log.warning("fetching %s from %s failed: %s", file, peer, exc)
                errors.append(f"{peer}: {exc}")
                if exc.permanent:
                    peers.remove(peer)
                continue
            digest = await asyncio.to_thread(_sha256_of, partial)
            if digest == sha256:
                await asyncio.to_thread(os.replace, partial, path)
                await asyncio.to_thread(_write_stamp, path, sha256)
                log.info("fetched %s from %s and verified it", file, peer)
                return path
            log.warning("%s from %s has sha256 %s, expected %s: deleting it and fetching again",
                        file, peer, digest, sha256)
            errors.append(f"{peer}: sent a file with sha256 {digest}")
            partial.unlink(missing_ok=True)
            peers = peers[i + 1:] + peers[:i + 1]  # the next round starts with another peer
            break
        else:
            if not peers:
                break
            if attempt < attempts:
                await asyncio.sleep(backoff_s * 2 ** (attempt - 1))
    raise ModelFileError(f"could not fetch {file} (sha256 {sha256}): " + "; ".join(errors))


async def _download(peer: str, file: str, sha256: str, partial: Path,
                    credentials: grpc.ChannelCredentials | None, progress: bool,
                    on_progress: Callable[[str, int, int], None] | None = None,
                    expect: Callable[[str], str | None] | None = None) -> None:
    """Appends the rest of the file from `peer` to `partial`; returns when it holds it all."""
    offset = await asyncio.to_thread(_size_or_zero, partial)
    if credentials is None:
        channel = grpc.aio.insecure_channel(peer, options=TRANSFER_OPTIONS)
    else:
        name = TARGET_NAME_OPTION
        if expect is not None:  # the member this address belongs to, and no other (a removed one posing as it)
            node_id = expect(peer)
            if node_id is None:
                raise _PeerFailed("no live member of this mesh serves gRPC there", permanent=True)
            name = target_for(node_id)
        channel = grpc.aio.secure_channel(peer, credentials, options=(*TRANSFER_OPTIONS, name))
    async with channel:
        fetch = channel.unary_stream(FETCH_MODEL,
                                     request_serializer=mesh_pb2.FetchModelRequest.SerializeToString,
                                     response_deserializer=mesh_pb2.ModelChunk.FromString)
        call = fetch(mesh_pb2.FetchModelRequest(file=file, sha256=sha256, offset=offset))
        out: BinaryIO | None = None  # opened at the first chunk: a refusal leaves no empty file
        report: _Progress | None = None
        try:
            while True:
                chunk = await call.read()
                if chunk is grpc.aio.EOF:
                    break
                if chunk.offset != offset:
                    raise _PeerFailed(f"sent a chunk at offset {chunk.offset}, expected {offset}")
                if offset + len(chunk.data) > chunk.total_size:
                    raise _PeerFailed(f"sent more than the {chunk.total_size} bytes it announced")
                if report is None:
                    report = _Progress(file, peer, chunk.total_size, offset, progress, on_progress)
                    out = await asyncio.to_thread(partial.open, "ab")
                await asyncio.to_thread(out.write, chunk.data)
                offset += len(chunk.data)
                report.update(offset)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.OUT_OF_RANGE:
                # Our partial file is longer than the peer's file: it is not a prefix of it.
                await asyncio.to_thread(partial.unlink, True)
            raise _PeerFailed(f"{exc.code().name}: {exc.details()}", exc.code() in _PERMANENT) from None
        finally:
            call.cancel()
            if out is not None:
                await asyncio.to_thread(_close_synced, out)
            if report is not None:
                report.close()
    if report is None:
        raise _PeerFailed("ended the stream without sending the file")
    if offset != report.total:
        raise _PeerFailed(f"ended the stream at byte {offset} of {report.total}")


class _Progress:
    """One INFO line per ~10% of the file, and a tqdm bar when asked for."""

    def __init__(self, file: str, peer: str, total: int, start: int, bar: bool,
                 listener: Callable[[str, int, int], None] | None = None) -> None:
        self.file, self.peer, self.total = file, peer, total
        self._listener = listener
        self._next = (start * 10 // total + 1) * 10 if total else 100
        self._bar = tqdm(total=total, initial=start, desc=f"fetching {file}", unit="B", unit_scale=True,
                         unit_divisor=1024, disable=not bar, leave=False, mininterval=0.5)
        self._done = start
        if start:
            log.info("fetching %s from %s: resuming at %d%% (%s)", file, peer, start * 100 // max(total, 1),
                     self._mb(start))

    def update(self, done: int) -> None:
        self._bar.update(done - self._done)
        self._done = done
        percent = done * 100 // self.total if self.total else 100
        if percent >= self._next:
            log.info("fetching %s from %s: %d%% (%s)", self.file, self.peer, percent, self._mb(done))
            if self._listener is not None:
                self._listener(self.peer, done, self.total)
            self._next = (percent // 10 + 1) * 10

    def _mb(self, done: int) -> str:
        return f"{done / 1e6:.0f}/{self.total / 1e6:.0f} MB"

    def close(self) -> None:
        self._bar.close()


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _close_synced(f: BinaryIO) -> None:
    try:
        f.flush()
        os.fsync(f.fileno())
    finally:
        f.close()


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _write_stamp(path: Path, sha256: str) -> None:
    """The stamp shards/model_files.py writes after verifying a file (its `_stamp`, which is
    private there): the same JSON, so is_verified() accepts the fetched file."""
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
    path.with_name(path.name + ".verified").write_text(json.dumps(stamp))
