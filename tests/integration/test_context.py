"""The context role in real meshd processes: /v1/embeddings through the official openai SDK (the
real all-MiniLM-L6-v2 encoder), a 40-turn conversation far beyond a 512-token window answered
from a fact planted in its second turn (the real default model), and a context replica on
another node serving embeddings and fitting over gRPC."""

from __future__ import annotations

import re

import httpx
import numpy as np
import openai
import pytest

from mesh.core.config import DEFAULT_ENCODER, DEFAULT_MODEL
from tests.procs import Meshd, kill_all, start_mesh, wait_until

ENCODER = DEFAULT_ENCODER.name
MODEL = DEFAULT_MODEL.name
WINDOW = 512
NEEDLE = "The password for the blue door is TANGERINE-47."
TOPICS = ["gardening", "bicycles", "baking bread", "the violin", "painting", "train trips", "knitting",
          "green tea", "fish tanks", "guitars"]


def catalog_toml(context_length: int) -> str:
    out = []
    for spec, ctx in ((DEFAULT_MODEL, context_length), (DEFAULT_ENCODER, DEFAULT_ENCODER.context_length)):
        out.append(f'[[models]]\nname = "{spec.name}"\npackage = "{spec.package}"\nfile = "{spec.file}"\n'
                   f'sha256 = "{spec.sha256}"\nroles = ["{spec.roles[0]}"]\ncontext_length = {ctx}\n'
                   + (f'chat_template = "{spec.chat_template}"\n' if spec.chat_template else ""))
    return "\n".join(out)


def context_ready(node: Meshd, where: str | None = None) -> bool:
    try:
        st = node.status()
    except httpx.HTTPError:
        return False
    names = {m["node_id"]: m["name"] for m in st["members"]}
    return any(s["role"] == "context" and s["state"] == "ready" and where in (None, names.get(s["node_id"]))
               for s in st["shards"])


@pytest.fixture(scope="module")
def small_window(tmp_path_factory):
    """One meshd, the real default model with a 512-token window, and the default encoder."""
    data_dir = tmp_path_factory.mktemp("context") / "node"
    data_dir.mkdir()
    (data_dir / "mesh.toml").write_text(catalog_toml(WINDOW) + "\n[replicas]\nreasoning = 1\ncontext = 1\n")
    with Meshd(data_dir) as meshd:
        meshd.wait_ready()
        wait_until(lambda: context_ready(meshd), 120, "the context shard to be ready")
        yield meshd


@pytest.fixture(scope="module")
def client(small_window):
    return openai.OpenAI(base_url=f"{small_window.base_url}/v1", api_key="x", max_retries=0, timeout=300)


def test_embeddings_through_the_openai_sdk(client):
    texts = ["The cat sits on the mat.", "A cat is sitting on a rug.", "Quarterly earnings rose by four percent."]
    r = client.embeddings.create(model=ENCODER, input=texts)  # the SDK asks for base64 and decodes it
    assert r.model == ENCODER and [d.index for d in r.data] == [0, 1, 2]
    v = np.array([d.embedding for d in r.data], dtype=np.float32)
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.4, "a paraphrase is closer than unrelated text"
    floats = client.embeddings.create(model=ENCODER, input=texts, encoding_format="float")
    assert np.array_equal(np.array([d.embedding for d in floats.data], dtype=np.float32), v)
    again = client.embeddings.create(model=ENCODER, input=texts[1])
    assert np.array_equal(np.array(again.data[0].embedding, dtype=np.float32), v[1])
    assert r.usage.prompt_tokens == r.usage.total_tokens > 3 * 3


@pytest.mark.parametrize("kw", [dict(input=""), dict(input=[]), dict(input=[[-1, 2, 3]]), dict(dimensions=10),
                                dict(input=[[1, 2, 10**9]]), dict(model=MODEL)])
def test_bad_embedding_requests_are_400(client, kw):
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(**{"model": ENCODER, "input": "hello", **kw})


def test_token_arrays_and_long_inputs_embed_as_openai_does(client):
    """Token ids of the encoder's vocabulary are an input like a text; an input over the 256-token
    window is cut to it, and usage counts what the encoder read."""
    out = client.embeddings.create(model=ENCODER, input=[[7592, 2088], "word " * 400])
    assert [len(d.embedding) for d in out.data] == [384, 384]
    assert out.usage.prompt_tokens == 4 + 256  # [CLS] 2 ids [SEP], then the cut text


def test_models_lists_the_encoder(client):
    assert {MODEL, ENCODER} <= {m.id for m in client.models.list().data}


def long_conversation(turns: int = 40) -> list[dict]:
    """Small talk with a fact planted in turn 2. The default model is a 270M base model: it copies
    well from a turn like the answer it should give, so the assistant repeats the fact back."""
    out = [{"role": "system", "content": "Answer the last question using facts the user told you."}]
    for t in range(1, turns + 1):
        topic = TOPICS[t % len(TOPICS)]
        if t == 2:
            out.append({"role": "user", "content": f"Remember this: {NEEDLE}"})
            out.append({"role": "assistant", "content": f"Got it. {NEEDLE}"})
            continue
        out.append({"role": "user", "content": f"Let us talk about {topic} for a while, part {t}."})
        out.append({"role": "assistant", "content": f"{topic.capitalize()} is a fine hobby (note {t})."})
    out.append({"role": "user", "content": "What is the password for the blue door?"})
    return out


def test_a_fact_from_turn_two_is_answered_after_40_turns(small_window, client):
    messages = long_conversation()
    total = sum(len(m["content"]) for m in messages)
    assert total > 6 * WINDOW, "the conversation must be far beyond the window (about 4 characters a token)"
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    answer = r.choices[0].message.content
    assert r.usage.prompt_tokens + 16 <= WINDOW
    assert re.search(r"fitted a conversation of 82 messages", small_window.log())
    assert "TANGERINE-47" in answer.upper().replace(" ", ""), f"answer: {answer!r}"


def test_embeddings_and_fitting_from_a_context_replica_on_another_node(tmp_path):
    """a holds the reasoning replica (null backend: no weights), b the encoder; a's gateway uses b
    over gRPC for /v1/embeddings and to fit a long chat."""
    nodes = start_mesh(tmp_path, ["a", "b"], replicas_on=["a"], backend="null")
    try:
        a = nodes["a"]
        a.post("/control/v1/assign", {"role": "context", "node": "b"}).raise_for_status()
        wait_until(lambda: context_ready(a, "b") and not context_ready(a, "a"), 120, "the encoder on b only")
        wait_until(lambda: not any(s["role"] == "context" for s in a.status()["local_shards"]), 60,
                   "a to unload its encoder")
        r = a.post("/v1/embeddings", {"model": ENCODER, "input": ["hello there", "general kenobi"]})
        assert r.status_code == 200, r.text
        assert [len(d["embedding"]) for d in r.json()["data"]] == [384, 384]
        messages = long_conversation()  # a ~5.5 kB prompt: beyond the null model's 4096-byte window
        r = a.post("/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 8}, timeout=120)
        assert r.status_code == 200, r.text
        assert "fitted a conversation of 82 messages" in a.log()
    finally:
        kill_all(nodes)
