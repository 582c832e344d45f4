"""POST /v1/embeddings: request validation, a context replica's encoder, the OpenAI answer.

Accepted (OpenAI's fields): `input` a non-empty string or a list of 1..MAX_INPUTS non-empty
strings; `model` a model of the context role; `encoding_format` "float" (default) or "base64"
(little-endian float32, what the openai SDK asks for by default); `dimensions` only if it equals
the model's (vectors cannot be shortened); `user` ignored. Token arrays (lists of integers) are
refused with a 400 that says so: the ids of another vocabulary mean nothing to this encoder. An
input longer than the model's window is a 400 naming its index, as OpenAI answers. Unknown
fields are ignored, as everywhere in the gateway.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Any

from mesh.gateway.errors import ApiError, bad_request, model_not_found, queue_full, unavailable
from mesh.router import NoReplica
from shards.types import NotReady, QueueFull

log = logging.getLogger("quorum.embeddings")

MAX_INPUTS = 2048  # OpenAI's limit for one request
FORMATS = ("float", "base64")


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str
    texts: tuple[str, ...]
    base64: bool
    dimensions: int | None


def parse_embeddings(body: dict[str, Any]) -> EmbeddingsRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a non-empty string.", "model")
    fmt = body.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if fmt not in FORMATS:
        raise bad_request(f"'encoding_format' must be one of {', '.join(FORMATS)}; got {fmt!r}.", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)
                                   or dimensions < 1):
        raise bad_request("'dimensions' must be a positive integer.", "dimensions")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request("'user' must be a string.", "user")
    return EmbeddingsRequest(model=model, texts=_texts(body), base64=fmt == "base64", dimensions=dimensions)


def _texts(body: dict[str, Any]) -> tuple[str, ...]:
    if "input" not in body or body["input"] is None:
        raise bad_request("'input' is required: a string or a list of strings.", "input")
    raw = body["input"]
    if isinstance(raw, str):
        raw = [raw]
    elif not isinstance(raw, list):
        raise bad_request("'input' must be a string or a list of strings.", "input")
    if not raw:
        raise bad_request("'input' must not be an empty list.", "input")
    if len(raw) > MAX_INPUTS:
        raise bad_request(f"'input' may hold at most {MAX_INPUTS} items; got {len(raw)}.", "input")
    if _token_array(raw) or any(_token_array(item) for item in raw):
        raise bad_request("'input' as token arrays is not supported by this server: token ids of another "
                          "vocabulary mean nothing to its encoder. Send the text instead.", "input")
    for i, item in enumerate(raw):
        if not isinstance(item, str):
            raise bad_request(f"'input[{i}]' must be a string; got {type(item).__name__}.", "input")
        if not item:
            raise bad_request(f"'input[{i}]' must not be empty.", "input")
    return tuple(raw)


def _token_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(x, int) and not isinstance(x, bool)
                                                           for x in value)


async def create_embeddings(gateway, body: dict[str, Any]) -> dict:
    """The answer to one /v1/embeddings body, or the ApiError that says why not."""
    req = parse_embeddings(body)
    _check_model(gateway, req.model)
    embedded = await embed(gateway, req.model, list(req.texts))
    dims = int(embedded.vectors.shape[1])
    if req.dimensions is not None and req.dimensions != dims:
        raise bad_request(f"Model '{req.model}' makes {dims}-dimensional vectors and cannot shorten them; "
                          f"'dimensions' must be {dims} or left out.", "dimensions")
    for i, count in enumerate(embedded.tokens):
        if count > embedded.n_ctx:
            raise bad_request(f"This model's maximum context length is {embedded.n_ctx} tokens, however "
                              f"input[{i}] has {count} tokens. Please shorten it.", "input",
                              "context_length_exceeded")
    data = [{"object": "embedding", "index": i, "embedding": _encode(vector, req.base64)}
            for i, vector in enumerate(embedded.vectors)]
    tokens = sum(embedded.tokens)
    return {"object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _encode(vector, as_base64: bool) -> list[float] | str:
    if as_base64:
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def _check_model(gateway, model: str) -> None:
    """404 for a model the mesh does not know, 400 for one that is no encoder, 503 while loading."""
    if model in gateway.picker.ready_models("context"):
        return
    if any(m.name == model and "context" in m.roles for m in gateway.config.models):
        raise unavailable(f"No replica of '{model}' is ready yet.", gateway.config.gateway.retry_after_s,
                          code="loading")
    if model in gateway.known_models():
        encoders = sorted(set(gateway.picker.ready_models("context"))
                          | {m.name for m in gateway.config.models if "context" in m.roles})
        raise bad_request(f"The model '{model}' does not make embeddings"
                          + (f"; use {', '.join(encoders)}." if encoders else "."), "model",
                          "model_not_embeddings")
    raise model_not_found(model)


async def embed(gateway, model: str, texts: list[str]):
    """Embeds `texts` on the least-loaded ready replica of the context `model`, trying the next one
    when a replica turns out to be unreachable. Raises ApiError (429, 503) when none can."""
    retry_after = gateway.config.gateway.retry_after_s
    avoid: set[str] = set()
    while True:
        try:
            node_id, replica = gateway.picker.pick("context", model, avoid)
        except NoReplica:
            raise unavailable(f"No replica of '{model}' is ready.", retry_after,
                              code="loading" if not avoid else "no_replica") from None
        try:
            return await replica.embed(texts)
        except QueueFull as exc:
            raise queue_full(str(exc), retry_after) from None
        except NotReady as exc:
            log.warning("context replica of %s on %s cannot take requests (%s); trying another", model, node_id, exc)
            avoid = avoid | {node_id}
        except ValueError as exc:  # the replica refused the texts: our own validation missed something
            raise ApiError(400, str(exc), param="input") from None
