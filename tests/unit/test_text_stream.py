"""shards/text.py TextStream: whole UTF-8 characters, exact stop sequences, held-back text released."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from shards.text import TextStream
from shards.types import Piece, TokenStep


class Vocab:
    """A toy vocabulary: token ids are handed out for byte strings as tests ask for them."""

    def __init__(self) -> None:
        self.by_id: dict[int, bytes] = {}
        self.by_bytes: dict[bytes, int] = {}

    def id(self, raw: bytes | str) -> int:
        raw = raw.encode() if isinstance(raw, str) else raw
        if raw not in self.by_bytes:
            self.by_bytes[raw] = len(self.by_id)
            self.by_id[len(self.by_id)] = raw
        return self.by_bytes[raw]

    def token_bytes(self, token: int) -> bytes:
        return self.by_id[token]

    def steps(self, *pieces: bytes | str) -> list[TokenStep]:
        return [TokenStep(self.id(p)) for p in pieces]


def run(stream: TextStream, steps: list[TokenStep]) -> list[Piece]:
    out = [stream.push(s) for s in steps]
    out.append(stream.finish())
    return [p for p in out if p is not None]


def joined(pieces: list[Piece]) -> str:
    return "".join(p.text for p in pieces)


def test_two_byte_character_split_across_tokens_comes_out_whole():
    vocab = Vocab()
    raw = "é".encode()
    stream = TextStream(vocab.token_bytes)
    first, second = vocab.steps(raw[:1], raw[1:])
    assert stream.push(first) is None, "half a character must be held back"
    piece = stream.push(second)
    assert piece is not None and piece.text == "é"
    assert piece.tokens == (first.token, second.token)
    assert stream.finish() is None
    assert stream.text == "é"


def test_four_byte_emoji_as_four_tokens_comes_out_whole():
    vocab = Vocab()
    raw = "a🙂b".encode()
    steps = vocab.steps(*(raw[i:i + 1] for i in range(len(raw))))
    pieces = run(TextStream(vocab.token_bytes), steps)
    assert [p.text for p in pieces] == ["a", "🙂", "b"]
    assert all("\ufffd" not in p.text for p in pieces)
    assert sum(len(p.tokens) for p in pieces) == len(steps)


def test_incomplete_character_at_finish_becomes_replacement_char():
    vocab = Vocab()
    stream = TextStream(vocab.token_bytes)
    assert stream.push(vocab.steps(b"ok")[0]).text == "ok"
    assert stream.push(vocab.steps("é".encode()[:1])[0]) is None
    tail = stream.finish()
    assert tail.text == "\ufffd"


def test_stop_spanning_several_tokens_stops_exactly_before_it():
    vocab = Vocab()
    stream = TextStream(vocab.token_bytes, stops=("STOP",))
    pieces = []
    for step in vocab.steps("hello ", "S", "T", "O", "P", " after"):
        if stream.stopped:
            break
        piece = stream.push(step)
        if piece is not None:
            pieces.append(piece)
    assert stream.stopped
    assert stream.finish() is None
    assert joined(pieces) == "hello " == stream.text


def test_stop_inside_one_token_cuts_that_token():
    vocab = Vocab()
    stream = TextStream(vocab.token_bytes, stops=("##",))
    pieces = run(stream, vocab.steps("ab##cd"))
    assert stream.stopped
    assert joined(pieces) == "ab"


def test_stop_at_very_start_releases_nothing():
    vocab = Vocab()
    stream = TextStream(vocab.token_bytes, stops=("<end>",))
    assert run(stream, vocab.steps("<e", "nd>", "more")) == []
    assert stream.stopped and stream.text == ""


def test_push_after_stop_returns_nothing():
    vocab = Vocab()
    stream = TextStream(vocab.token_bytes, stops=("x",))
    stream.push(vocab.steps("ax")[0])
    assert stream.push(vocab.steps("more")[0]) is None
    assert stream.finish() is None


def test_possible_stop_prefix_is_held_then_released_by_finish():
    vocab = Vocab()
    stream = TextStream(vocab.token_bytes, stops=("<end>",))
    first = stream.push(vocab.steps("text <e")[0])
    assert first.text == "text ", "'<e' could still become '<end>'"
    assert stream.push(vocab.steps("n")[0]) is None
    tail = stream.finish()
    assert tail.text == "<en"
    assert not stream.stopped
    assert stream.text == "text <en"


def test_held_prefix_released_when_next_token_breaks_it():
    vocab = Vocab()
    stream = TextStream(vocab.token_bytes, stops=("<end>",))
    assert stream.push(vocab.steps("a<")[0]).text == "a"
    assert stream.push(vocab.steps("b")[0]).text == "<b"


def test_earliest_of_several_stops_wins():
    vocab = Vocab()
    stream = TextStream(vocab.token_bytes, stops=("world", "lo w", "zzz"))
    pieces = run(stream, vocab.steps("hello world"))
    assert stream.stopped
    assert joined(pieces) == "hel"


def test_empty_stop_strings_are_ignored():
    vocab = Vocab()
    stream = TextStream(vocab.token_bytes, stops=("",))
    assert joined(run(stream, vocab.steps("abc", "def"))) == "abcdef"
    assert not stream.stopped


def test_logprobs_attached_to_released_tokens():
    vocab = Vocab()
    raw = "é".encode()
    a, b, c = vocab.id("x"), vocab.id(raw[:1]), vocab.id(raw[1:])
    steps = [TokenStep(a, math.log(0.5), ((a, math.log(0.5)), (c, math.log(0.25)))),
             TokenStep(b, math.log(0.9)), TokenStep(c, None)]
    stream = TextStream(vocab.token_bytes, with_logprobs=True)
    pieces = run(stream, steps)
    assert [p.text for p in pieces] == ["x", "é"]
    x_lp = pieces[0].logprobs
    assert len(x_lp) == 1
    assert x_lp[0].token == "x" and x_lp[0].bytes == (ord("x"),) and x_lp[0].logprob == math.log(0.5)
    assert [(t, lp) for t, lp, _ in x_lp[0].top] == [("x", math.log(0.5)), ("\ufffd", math.log(0.25))]
    assert x_lp[0].top[1][2] == tuple(raw[1:])
    e_lp = pieces[1].logprobs
    assert [e.bytes for e in e_lp] == [tuple(raw[:1]), tuple(raw[1:])]
    assert e_lp[0].logprob == math.log(0.9)
    assert e_lp[1].logprob == 0.0, "a token without a logprob reports 0.0"


def test_no_logprobs_without_with_logprobs():
    vocab = Vocab()
    pieces = run(TextStream(vocab.token_bytes), [TokenStep(vocab.id("a"), -1.0)])
    assert pieces[0].logprobs == ()


def test_every_token_is_reported_once_in_order_when_no_stop_occurs():
    vocab = Vocab()
    steps = vocab.steps("ab", "<", "en", "d", "x")
    pieces = run(TextStream(vocab.token_bytes, stops=("<end>",), with_logprobs=True), steps)
    assert joined(pieces) == "ab<endx"
    assert [t for p in pieces for t in p.tokens] == [s.token for s in steps]
    assert all(len(p.logprobs) == len(p.tokens) for p in pieces)


def cut(text: str, sizes: list[int]) -> list[str]:
    """`text` cut into tokens of the given sizes (the last token takes whatever is left)."""
    tokens, pos = [], 0
    for n in sizes:
        if pos >= len(text):
            break
        tokens.append(text[pos:pos + n])
        pos += n
    if pos < len(text):
        tokens.append(text[pos:])
    return tokens


def unique_steps(tokens: list[str]) -> tuple[dict[int, bytes], list[TokenStep]]:
    """One token id per position, so a released id says exactly which token it was."""
    table = {i: t.encode() for i, t in enumerate(tokens)}
    return table, [TokenStep(i) for i in range(len(tokens))]


def stream_all(stream: TextStream, steps: list[TokenStep]) -> list[Piece]:
    """Pushes tokens until the stream stops (as the engine does), then finishes it."""
    pieces = []
    for step in steps:
        piece = stream.push(step)
        if piece is not None:
            pieces.append(piece)
        if stream.stopped:
            break
    tail = stream.finish()
    if tail is not None:
        pieces.append(tail)
    return pieces


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="abc<>", max_size=40),
    st.lists(st.integers(min_value=1, max_value=6), max_size=40),
    st.lists(st.text(alphabet="abc<>", min_size=1, max_size=4), max_size=3),
)
def test_released_text_is_text_up_to_first_stop(text, cuts, stops):
    # Drop a stop that sits inside another one: then which stop "occurs first" depends on the token
    # boundaries (the shorter one can complete earlier); that case has its own test below.
    stops = [s for s in stops if not any(s != o and s in o for o in stops)]
    table, steps = unique_steps(cut(text, cuts))
    stream = TextStream(table.__getitem__, stops=tuple(stops))
    pieces = stream_all(stream, steps)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[:min(hits)] if hits else text
    assert joined(pieces) == expected == stream.text
    assert stream.stopped == bool(hits)
    assert all(p.text for p in pieces), "no empty pieces"


def test_shorter_stop_inside_longer_one_stops_when_it_completes():
    vocab = Vocab()
    stream = TextStream(vocab.token_bytes, stops=("abcd", "bc"))
    pieces = run(stream, vocab.steps("a", "b", "c", "d"))
    assert stream.stopped
    assert joined(pieces) == "a"


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="abc", max_size=30),
    st.lists(st.integers(min_value=1, max_value=4), max_size=30),
    st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3),
)
def test_released_tokens_are_a_prefix_of_pushed_tokens_each_once(text, cuts, stops):
    table, steps = unique_steps(cut(text, cuts))
    stream = TextStream(table.__getitem__, stops=tuple(stops), with_logprobs=True)
    pieces = stream_all(stream, steps)
    released = [t for p in pieces for t in p.tokens]
    assert released == list(range(len(released)))
    if not stream.stopped:
        assert released == [s.token for s in steps]
    assert all(len(p.logprobs) == len(p.tokens) for p in pieces)


def test_a_token_goes_out_with_the_piece_its_text_starts_in():
    table = {1: b"ab", 2: b"cd", 3: b"e", 4: b"f", 5: b"Q"}
    stream = TextStream(table.__getitem__, stops=("abcdX", "bcdeY", "cdefZ"))
    pieces = stream_all(stream, [TokenStep(t) for t in table])
    assert joined(pieces) == "abcdefQ"
    # Token 2 ("cd") starts at offset 2: it must not go out before text up to offset 3 has.
    released_text = 0
    token_start = {1: 0, 2: 2, 3: 4, 4: 5, 5: 6}
    for piece in pieces:
        released_text += len(piece.text)
        for token in piece.tokens:
            assert token_start[token] < released_text, (token, piece)
