"""POST /v1/embeddings: request validation, a context replica's encoder, the OpenAI answer.

Accepted (OpenAI's fields): `input` as OpenAI takes it: a non-empty string, a list of strings, a
list of token ids, or a list of lists of token ids (lists of strings and of token ids may be
mixed), 1..MAX_INPUTS inputs; token ids are ids of the encoder's own vocabulary (all-MiniLM's
WordPiece for the default encoder: what its tokenizer.json gives for a text, without [CLS] and
[SEP], which the encoder adds as it does around a text), and an id outside that vocabulary is a
400 naming the input. `model` a model of the context role; `encoding_format` "float" (default)
or "base64" (little-endian float32, what the openai SDK asks for by default); `dimensions` only
if it equals the model's (vectors cannot be shortened); `user` ignored. Unknown fields are
ignored, as everywhere in the gateway.

Inputs longer than the encoder's window (256 tokens for the default, [CLS] and [SEP] included)
are cut to it, as sentence-transformers does, and `usage` counts the tokens the encoder read.
With `gateway.embeddings_truncate = false` in mesh.toml such an input is a 400 naming its index
instead, as OpenAI answers.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Any

from mesh.core.errors import ApiError, bad_request, model_not_found, queue_full, unavailable
from mesh.replicas.router import try_replicas
from raft.vocab import Role
from shards.types import NotReady, QueueFull, ShardError

log = logging.getLogger("quorum.embeddings")

MAX_INPUTS = 2048  # OpenAI's limit for one request
MAX_TOKEN_IDS = 300_000  # token ids in one request, all inputs together (OpenAI's limit)
MAX_TOKEN_ID = 2**31 - 1  # beyond any vocabulary; the encoder checks against its own
FORMATS = ("float", "base64")

Input = str | tuple[int, ...]  # a text, or token ids of the encoder's vocabulary


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str
    inputs: tuple[Input, ...]
    base64: bool
    dimensions: int | None

    @property
    def texts(self) -> tuple[Input, ...]:
        return self.inputs


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
    return EmbeddingsRequest(model=model, inputs=_inputs(body), base64=fmt == "base64", dimensions=dimensions)


def _inputs(body: dict[str, Any]) -> tuple[Input, ...]:
    form = "a string, a list of strings, a list of token ids or a list of lists of token ids"
    if "input" not in body or body["input"] is None:
        raise bad_request(f"'input' is required: {form}.", "input")
    raw = body["input"]
    if isinstance(raw, str) or _token_array(raw):
        raw = [raw]
    elif not isinstance(raw, list):
        raise bad_request(f"'input' must be {form}.", "input")
    if not raw:
        raise bad_request("'input' must not be an empty list.", "input")
    if len(raw) > MAX_INPUTS:
        raise bad_request(f"'input' may hold at most {MAX_INPUTS} items; got {len(raw)}.", "input")
    out: list[Input] = []
    ids = 0
    for i, item in enumerate(raw):
        if isinstance(item, str):
            if not item:
                raise bad_request(f"'input[{i}]' must not be empty.", "input")
            out.append(item)
        elif _token_array(item):
            bad = next((x for x in item if not 0 <= x <= MAX_TOKEN_ID), None)
            if bad is not None:
                raise bad_request(f"'input[{i}]' holds the token id {bad}; token ids are between 0 and the "
                                  f"encoder's vocabulary size.", "input")
            ids += len(item)
            out.append(tuple(item))
        elif isinstance(item, list) and not item:
            raise bad_request(f"'input[{i}]' must not be an empty list of token ids.", "input")
        else:
            raise bad_request(f"'input[{i}]' must be a string or a list of token ids (integers); "
                              f"got {_kind(item)}.", "input")
    if ids > MAX_TOKEN_IDS:
        raise bad_request(f"'input' may hold at most {MAX_TOKEN_IDS} token ids in all; got {ids}.", "input")
    return tuple(out)


def _token_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(x, int) and not isinstance(x, bool)
                                                           for x in value)


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list that is not all integers"
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
            dict: "an object"}.get(type(value), type(value).__name__)


def truncates(gateway) -> bool:
    """Whether inputs over the window are cut (True) or refused (see the module doc)."""
    return gateway.config.gateway.embeddings_truncate


async def create_embeddings(gateway, body: dict[str, Any]) -> dict:
    """The answer to one /v1/embeddings body, or the ApiError that says why not."""
    req = parse_embeddings(body)
    _check_model(gateway, req.model)
    embedded = await embed(gateway, req.model, list(req.inputs))
    dims = int(embedded.vectors.shape[1])
    if req.dimensions is not None and req.dimensions != dims:
        raise bad_request(f"Model '{req.model}' makes {dims}-dimensional vectors and cannot shorten them; "
                          f"'dimensions' must be {dims} or left out.", "dimensions")
    if not truncates(gateway):
        for i, count in enumerate(embedded.tokens):
            if count > embedded.n_ctx:
                raise bad_request(f"This model's maximum context length is {embedded.n_ctx} tokens, however "
                                  f"input[{i}] has {count} tokens. Please shorten it.", "input",
                                  "context_length_exceeded")
    data = [{"object": "embedding", "index": i, "embedding": _encode(vector, req.base64)}
            for i, vector in enumerate(embedded.vectors)]
    tokens = sum(min(count, embedded.n_ctx) for count in embedded.tokens)  # what the encoder read
    return {"object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _encode(vector, as_base64: bool) -> list[float] | str:
    if as_base64:
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def _check_model(gateway, model: str) -> None:
    """404 for a model the mesh does not know, 400 for one that is no encoder, 503 while loading."""
    if model in gateway.picker.ready_models(Role.CONTEXT):
        return
    if any(m.name == model and Role.CONTEXT in m.roles for m in gateway.config.models):
        raise unavailable(f"No replica of '{model}' is ready yet.", gateway.config.gateway.retry_after_s,
                          code="loading")
    if model in gateway.known_models():
        encoders = sorted(set(gateway.picker.ready_models(Role.CONTEXT))
                          | {m.name for m in gateway.config.models if Role.CONTEXT in m.roles})
        raise bad_request(f"The model '{model}' does not make embeddings"
                          + (f"; use {', '.join(encoders)}." if encoders else "."), "model",
                          "model_not_embeddings")
    raise model_not_found(model)


async def embed(gateway, model: str, texts: list[Input]):
    """Embeds `texts` (texts or token ids) on the least-loaded ready replica of the context `model`, trying the next one
    when a replica turns out to be unreachable. Raises ApiError (429, 503) when none can."""
    retry_after = gateway.config.gateway.retry_after_s

    async def none_left(avoid: set[str]) -> set[str]:
        raise unavailable(f"No replica of '{model}' is ready.", retry_after,
                          code="loading" if not avoid else "no_replica")

    async def use(replica):
        try:
            return await replica.embed(texts)
        except QueueFull as exc:
            raise queue_full(str(exc), retry_after) from None
        except NotReady:
            raise  # try_replicas tries the next replica
        except ValueError as exc:  # the replica refused the inputs (a token id outside its vocabulary)
            raise ApiError(400, str(exc), param="input") from None
        except ShardError as exc:
            if getattr(exc, "reason", None) == "bad_request":  # the same refusal, from a peer over gRPC
                raise ApiError(400, str(exc).removeprefix("INVALID_ARGUMENT: "), param="input") from None
            raise

    _, embedded = await try_replicas(lambda avoid: gateway.picker.pick(Role.CONTEXT, model, avoid), use, none_left,
                                     f"context replica of {model}")
    return embedded
