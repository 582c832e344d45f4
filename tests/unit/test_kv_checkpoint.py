"""KV checkpoints on their way from a replica to the gateway: the engine puts the latest one on the
next piece it emits, and the gRPC conversions carry it both ways (pieces and resumed requests)."""

from __future__ import annotations

import threading

from shards.backend_null import NullBackend
from shards.engine import Engine, Job
from shards.grpc_service import event_from_proto, event_to_proto, request_from_proto, request_to_proto
from shards.types import Finished, GenerateRequest, Message, Piece, Sampling, TokenStep

WAIT_S = 10.0


class CheckpointingBackend(NullBackend):
    """NullBackend whose steps 3 and 6 carry a checkpoint, and which records what a resume passed."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.resumed_with: list[tuple[bytes, int]] = []

    def generate(self, prompt, sampling, seed, forced=(), resume_kv=b"", resume_kv_tokens=0, checkpoints=False):
        self.resumed_with.append((resume_kv, resume_kv_tokens))
        for i, step in enumerate(super().generate(prompt, sampling, seed, forced)):
            if i in (3, 6):
                step = TokenStep(step.token, kv=bytes([i]) * 5, kv_tokens=len(prompt) + i)
            yield step


def run(engine: Engine, job_kwargs: dict) -> list:
    events, ended = [], threading.Event()

    def emit(event):
        events.append(event)
        if isinstance(event, Finished):
            ended.set()

    engine.submit([Job(emit=emit, **job_kwargs)])
    assert ended.wait(WAIT_S)
    return events


def test_the_engine_puts_each_checkpoint_on_the_next_piece():
    backend = CheckpointingBackend(reply="ab cd ef gh")
    engine = Engine(backend, queue_depth=4)
    try:
        events = run(engine, {"prompt": [1, 2, 3], "sampling": Sampling(temperature=0.0)})
        pieces = [e for e in events if isinstance(e, Piece)]
        assert "".join(p.text for p in pieces) == "ab cd ef gh"
        carried = [(p.kv, p.kv_tokens) for p in pieces if p.kv]
        assert carried == [(bytes([3]) * 5, 6), (bytes([6]) * 5, 9)]
        # Each rides on the piece holding its step's token or a later one.
        sent = 0
        for p in pieces:
            sent += len(p.tokens)
            if p.kv:
                assert p.kv_tokens - 3 < sent
        assert backend.resumed_with == [(b"", 0)]
        run(engine, {"prompt": [1, 2, 3], "sampling": Sampling(temperature=0.0), "forced": (97, 98),
                     "resume_kv": b"xyz", "resume_kv_tokens": 4})
        assert backend.resumed_with[-1] == (b"xyz", 4)
    finally:
        engine.close()


def test_a_backend_without_checkpoints_is_called_as_before():
    engine = Engine(NullBackend(reply="hello"), queue_depth=4)
    try:
        events = run(engine, {"prompt": [1], "sampling": Sampling(temperature=0.0), "forced": (104,)})
        assert "".join(e.text for e in events if isinstance(e, Piece)) == "hello"
    finally:
        engine.close()


def test_grpc_conversions_carry_checkpoints():
    piece = Piece("ab", (1, 2), kv=b"\x00\x01kv" * 1000, kv_tokens=42)
    assert event_from_proto(event_to_proto(3, piece)) == (3, piece)
    assert event_from_proto(event_to_proto(0, Piece("c", (3,)))) == (0, Piece("c", (3,)))
    req = GenerateRequest(Sampling(temperature=0.0), messages=(Message("user", "hi"),), resume_tokens=(5, 6, 7),
                          resume_kv=b"\xffstate", resume_kv_tokens=9)
    back = request_from_proto(request_to_proto("reasoning", "m", req))
    assert (back.resume_tokens, back.resume_kv, back.resume_kv_tokens) == ((5, 6, 7), b"\xffstate", 9)


class Recording:
    """A replica that records what it was asked and refuses (the test needs only the request)."""
    role, model = "reasoning", "m"

    def __init__(self) -> None:
        self.asked: list = []

    async def open(self, req):
        from shards.types import NotReady

        self.asked.append(req)
        raise NotReady("recording only")


def test_the_gateway_asks_for_checkpoints_as_configured():
    import asyncio
    import dataclasses

    from mesh.core.config import MeshConfig
    from mesh.core.errors import ApiError
    from mesh.core.metrics import Metrics
    from mesh.gateway.service import Gateway
    from mesh.gateway.validation import parse_chat

    for enabled in (True, False):
        cfg = MeshConfig()
        cfg = dataclasses.replace(cfg, gateway=dataclasses.replace(cfg.gateway, kv_checkpoints=enabled))
        gateway = Gateway(cfg, Metrics())
        replica = Recording()
        gateway.picker.shards[("reasoning", cfg.models[0].name)] = replica
        req = parse_chat({"model": cfg.models[0].name, "messages": [{"role": "user", "content": "hi"}]}, cfg.gateway)
        try:
            asyncio.run(gateway.start_chat(req))
        except ApiError:
            pass  # the recording replica refuses: 503 no_replica, after it saw the request
        assert replica.asked and all(r.kv_checkpoints is enabled for r in replica.asked)
