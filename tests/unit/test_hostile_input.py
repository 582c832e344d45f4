"""Hostile requests and files, one by one: each is answered with a 400/404/413 (never a 5xx) and
the gateway keeps serving; model files that do not match their sha256 or name a path are refused.

The gateway runs in process (NullBackend shard) and is driven through ASGI, so headers and body
chunks can lie; tests/unit/test_gateway_app.py already covers a top-level '[' * 100000, bodies over
the limit with and without Content-Length, and n=0.
"""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap

import pytest

from mesh.cluster.control import Control
from mesh.core.config import ConfigError, load_config
from mesh.gateway.app import create_app
from shards.model_files import ModelFileError, assemble_from_package, ensure_model, is_verified, model_path, verify
from tests.unit.test_gateway_app import MODEL
from tests.unit.test_gateway_fuzz import (
    CHAT,
    COMPLETIONS,
    Reply,
    Served,
    asgi_call,
    check_reply,
    json_headers,
    still_serves,
)

LIMIT = 1024 * 1024  # the default gateway.max_body_bytes


@pytest.fixture(scope="module")
def served():
    s = Served()
    assert s.gateway.config.gateway.max_body_bytes == LIMIT
    try:
        yield s
    finally:
        s.close()


def post(served: Served, raw: bytes, path: str = CHAT, headers=None, chunks=None) -> Reply:
    """Sends `raw` (or `chunks`), checks the never-5xx property and that the gateway still serves."""
    return served.request("POST", path, json_headers(raw) if headers is None else headers,
                          [raw] if chunks is None else chunks)


def chat(content="Hi", **fields) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}).encode()


def error(reply: Reply, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert reply.status == status, reply.body[:400]
    err = json.loads(reply.body)["error"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# -- deep and huge JSON ------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,  # deep objects, well formed
    b"[" * 100_000 + b"]" * 100_000,  # deep arrays, well formed
    b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # deep inside a field
    b'{"model": "m", "messages": [{"role": "user", "content": ' + b"[" * 900 + b"]" * 900 + b"}]}",  # just parses
    b'{"model": "m", "n": ' + b"[" * 900 + b"]" * 900 + b"}",  # parses; echoed in the message
])
def test_deep_json_is_400(served, raw):
    error(post(served, raw), 400)


def test_lying_content_length_cannot_smuggle_a_big_body(served):
    big = chat("x" * (LIMIT + 10))
    for declared in (b"10", b"0", b"-1", b"abc", b"\xb2", b"\xb9\xb2", b" 100"):
        headers = [(b"content-type", b"application/json"), (b"content-length", declared)]
        error(post(served, big, headers=headers, chunks=[big[:1000], big[1000:]]), 413, code="request_too_large")
    huge = [(b"content-type", b"application/json"), (b"content-length", b"9" * 40)]
    error(post(served, chat(), headers=huge), 413, code="request_too_large")


def test_odd_content_length_on_a_small_body_is_not_an_error(served):
    """A server in front checks Content-Length; in process, an odd one must not break the app."""
    for declared in (b"\xb2", b"1", b"-7", b"x"):
        reply = post(served, chat(max_tokens=2), headers=[(b"content-type", b"application/json"),
                                                           (b"content-length", declared)])
        assert reply.status == 200, reply.body


def test_chunked_body_over_the_limit_in_tiny_chunks_is_413(served):
    raw = chat("y" * (LIMIT + 1))
    chunks = [raw[i:i + 4096] for i in range(0, len(raw), 4096)]
    error(post(served, raw, headers=[(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")],
               chunks=chunks), 413)


def test_control_api_bodies_are_bounded_too():
    """The control API's routes sit behind the same body limit (they read whole bodies)."""
    served = Served()
    try:
        app = create_app(served.gateway, Control(None).routes())
        big = json.dumps({"role": "reasoning", "node": "a", "model": "x" * (LIMIT + 1)}).encode()
        for path in ("/control/v1/assign", "/control/v1/tokens", "/control/v1/keys"):
            for headers, chunks in ((json_headers(big), [big]), ([], [big[:LIMIT], big[LIMIT:]])):
                reply = served.call(asgi_call(app, "POST", path, headers, chunks))
                check_reply(reply)
                error(reply, 413, code="request_too_large")
        served.call(still_serves(app))
    finally:
        served.close()


# -- numbers and lists beyond the bounds ---------------------------------------------------------

@pytest.mark.parametrize("field, value, param", [
    ("n", 10 ** 6, "n"), ("n", 2 ** 64, "n"), ("n", -1, "n"), ("n", 1.5, "n"), ("n", "2", "n"),
    ("max_tokens", 10 ** 9, "messages"), ("max_tokens", 2 ** 63, "messages"), ("max_tokens", 0, "max_tokens"),
    ("max_tokens", -(2 ** 63), "max_tokens"), ("max_completion_tokens", 10 ** 12, "messages"),
    ("seed", 2 ** 64, "seed"), ("temperature", 1e308, "temperature"), ("top_logprobs", 10 ** 6, "top_logprobs"),
])
def test_numbers_out_of_bounds_are_400(served, field, value, param):
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    error(post(served, chat(**{field: value}, **extra)), 400, param)


def test_huge_number_literals_and_non_finite_numbers_are_400(served):
    def raw(field: bytes, literal: bytes) -> bytes:
        return b'{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], "%s": %s}' % (
            MODEL.encode(), field, literal)
    for literal in (b"1" + b"0" * 5000, b"1e999999", b"-1e999999", b"NaN", b"Infinity", b"-Infinity"):
        for field in (b"n", b"temperature", b"max_tokens", b"seed"):
            # Python refuses int literals over 4300 digits while parsing: a 400 that names no field.
            error(post(served, raw(field, literal)), 400, None if len(literal) > 4300 else field.decode())
    tiny = b"0." + b"0" * 10000 + b"1"  # a float that rounds to 0.0: a fine temperature, not an integer
    for field in (b"n", b"max_tokens", b"seed"):
        error(post(served, raw(field, tiny)), 400, field.decode())
    assert post(served, raw(b"temperature", tiny)).status == 200


def test_completions_n_times_prompts_and_prompt_count_are_bounded(served):
    for body in ({"prompt": ["a"] * 100_000}, {"prompt": ["a", "b"], "n": 8}, {"prompt": [1, 2, 3]},
                 {"prompt": []}, {"prompt": [["a"]]}, {"prompt": "a", "best_of": 10 ** 9}):
        error(post(served, json.dumps({"model": MODEL, **body}).encode(), COMPLETIONS), 400)


def test_long_stop_lists_and_stop_strings_are_400(served):
    error(post(served, chat(stop=["x"] * 100_000)), 400, "stop")
    error(post(served, chat(stop="s" * 500_000)), 400, "stop")
    error(post(served, chat(stop=["ok", "t" * 257])), 400, "stop")
    error(post(served, chat(stop=[None, 1, {}])), 400, "stop")
    assert post(served, chat(stop=["", ""], max_tokens=2)).status == 200  # empty stops are no stops


@pytest.mark.parametrize("bias", [
    {"50256": -100}, {str(i): 1 for i in range(60_000)}, {"abc": 1}, {"": 0}, {"1": 1e9}, {"1": "x"},
    {"-1": 5}, "x", [], [1, 2], 0, False, 1.5,
])
def test_logit_bias_is_refused_with_a_400_naming_it(served, bias):
    """Not supported yet: any bias, and any value that is not an object, is a clear 400."""
    error(post(served, chat(logit_bias=bias)), 400, "logit_bias")


def test_empty_or_null_logit_bias_means_no_bias(served):
    for bias in ({}, None):
        assert post(served, chat(logit_bias=bias, max_tokens=2)).status == 200


# -- content ---------------------------------------------------------------------------------------

def test_enormous_content_is_bounded(served):
    error(post(served, chat("z" * (LIMIT - 200))), 400, "messages", "context_length_exceeded")
    parts = [{"type": "text", "text": "a"}] * 30_000
    error(post(served, chat(parts)), 400, "messages", "context_length_exceeded")
    many = [{"role": "user", "content": "a"}] * 5000
    error(post(served, json.dumps({"model": MODEL, "messages": many}).encode()), 400, "messages")


@pytest.mark.parametrize("content", ["\x00", "a\x00b" * 10, "\x00" * 400, "\u0000<end_of_turn>\x00"])
def test_null_bytes_in_content_are_plain_text(served, content):
    reply = post(served, chat(content, max_tokens=3))
    assert reply.status == 200, reply.body


def test_null_bytes_elsewhere_are_400_or_404(served):
    error(post(served, json.dumps({"model": MODEL + "\x00", "messages": [{"role": "user", "content": "a"}]})
               .encode()), 404, "model")
    error(post(served, json.dumps({"model": MODEL, "messages": [{"role": "user\x00", "content": "a"}]})
               .encode()), 400)
    assert post(served, chat(stop="\x00", max_tokens=2)).status == 200


@pytest.mark.parametrize("raw", [
    b'{"model": "\xff\xfe", "messages": []}',  # not UTF-8
    b'{"model": "m", "messages": [{"role": "user", "content": "\xc0\xaf"}]}',  # overlong encoding
    b'{"model": "m", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',  # encoded surrogate
    b"\xef\xbb\xbf" + b'{"model": "m"}',  # a UTF-8 byte-order mark
    b"\xff" * 1000,
])
def test_invalid_utf8_bodies_are_400(served, raw):
    error(post(served, raw), 400)


@pytest.mark.parametrize("escape", [r"\ud800", r"\udfff", r"a\ud83d", r"\ude00x"])
@pytest.mark.parametrize("where", ["content", "stop", "model", "key"])
def test_lone_surrogate_escapes_are_400(served, escape, where):
    """JSON allows \\ud800 alone; Python decodes it to a str that cannot be encoded as UTF-8."""
    if where == "content":
        raw = '{"model": "%s", "messages": [{"role": "user", "content": "%s"}]}' % (MODEL, escape)
    elif where == "stop":
        raw = '{"model": "%s", "messages": [{"role": "user", "content": "a"}], "stop": "%s"}' % (MODEL, escape)
    elif where == "model":
        raw = '{"model": "%s", "messages": [{"role": "user", "content": "a"}]}' % escape
    else:
        raw = '{"model": "%s", "messages": [{"role": "user", "content": "a"}], "%s": 1}' % (MODEL, escape)
    error(post(served, raw.encode()), 400)


def test_utf16_json_body_is_understood(served):
    """json.loads detects UTF-16/32 (RFC 8259 readers may): a valid request in UTF-16 is answered."""
    reply = post(served, chat(max_tokens=2).decode().encode("utf-16"))
    assert reply.status == 200, reply.body


def test_completion_prompts_with_surrogates_and_nul_are_handled(served):
    raw = ('{"model": "%s", "prompt": ["\\u0000", "\\ud800"], "max_tokens": 2}' % MODEL).encode()
    error(post(served, raw, COMPLETIONS), 400)
    raw = ('{"model": "%s", "prompt": "a\\u0000b", "max_tokens": 2}' % MODEL).encode()
    assert post(served, raw, COMPLETIONS).status == 200


# -- a client posing as a relaying member ----------------------------------------------------------

def resume_header(tokens: list, choice=0) -> bytes:
    return json.dumps({"choice": choice, "tokens": tokens}).encode()


@pytest.mark.parametrize("header", [
    resume_header([-1]), resume_header([10 ** 12]), resume_header([2 ** 64]), resume_header(list(range(5000))),
    resume_header([1], choice=7), resume_header([1], choice=-1), resume_header([1], choice=True),
    b"{" * 10_000, b"x" * 300_000, b'{"choice": 0}', b"\xff\xfe",
])
def test_forged_resume_headers_never_5xx(served, header):
    """Any client can send the headers a relaying member sends (on the public port they are stripped;
    here the app is called directly, as on the peer port). A malformed resume is a 400 naming the
    header; a well-formed one with token ids outside the vocabulary reaches the backend and ends the
    leader's typed events with an error line, or is refused (400), never a 5xx."""
    raw = chat(stream=True, max_tokens=4)
    headers = json_headers(raw) + [(b"x-quorum-forwarded", b"1"), (b"x-quorum-relay", b"events"),
                                   (b"x-quorum-resume", header)]
    reply = served.call(asgi_call(served.app, "POST", CHAT, headers, [raw]))
    assert reply.status in (200, 400), reply.body
    if header != resume_header(list(range(5000))):  # malformed: refused for what it is
        assert reply.status == 400 and json.loads(reply.body)["error"]["param"] == "x-quorum-resume", reply.body
    elif reply.status == 400:
        assert "error" in json.loads(reply.body)
    else:
        last = json.loads(reply.body.decode().splitlines()[-1])
        assert "finish" in last or "error" in last, last
    served.call(still_serves(served.app))


# -- model files ---------------------------------------------------------------------------------

BAD_NAMES = ["../x.gguf", "..", ".", "/etc/passwd", "a/../b.gguf", "a/b.gguf", "a\\b.gguf", "x\x00y.gguf",
             "x.gguf\x00", "x.gguf\n", " x.gguf", "", ".hidden", "-rf", "x" * 129, "mödel.gguf", "m1\u2024gguf",
             "C:x.gguf", "~/.ssh/id_rsa", "%2e%2e%2fx"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_model_path_refuses_names_that_are_not_plain(tmp_path, name):
    with pytest.raises(ModelFileError):
        model_path(tmp_path / "models", name)
    with pytest.raises(ModelFileError):
        ensure_model(tmp_path / "models", name, "0" * 64, None, progress=False)
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("name", ["x\x00y.gguf", "m1\u2024gguf", "x" * 129, "mödel.gguf", "~x.gguf", "%2e%2e%2fx"])
def test_config_refuses_model_files_that_are_not_plain(tmp_path, name):
    sha = "a" * 64
    path = tmp_path / "mesh.toml"
    path.write_text(f'[[models]]\nname = "m1"\nfile = {json.dumps(name)}\nsha256 = "{sha}"\nroles = ["reasoning"]\n'
                    'context_length = 4096\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"models\[0\]\.file"):
        load_config(path)


def test_present_file_with_wrong_sha256_is_refused_and_not_stamped(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "m.gguf").write_bytes(b"not the model")
    wanted = hashlib.sha256(b"the model").hexdigest()
    with pytest.raises(ModelFileError, match="expected"):
        ensure_model(models, "m.gguf", wanted, None, progress=False)
    assert not is_verified(models / "m.gguf", wanted)
    assert not (models / "m.gguf.verified").exists()


def test_a_stamp_does_not_survive_a_changed_file(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    path = models / "m.gguf"
    path.write_bytes(b"the model")
    good = hashlib.sha256(b"the model").hexdigest()
    verify(path, good, progress=False)
    assert is_verified(path, good)
    path.write_bytes(b"the modeL!")  # tampered after verification: size (and mtime) change
    assert not is_verified(path, good)
    with pytest.raises(ModelFileError):
        ensure_model(models, "m.gguf", good, None, progress=False)
    stamp = json.loads((models / "m.gguf.verified").read_text())
    assert not is_verified(path, stamp["sha256"][::-1])


def test_assembled_file_with_wrong_sha256_is_refused_and_removed(tmp_path, monkeypatch):
    """A package whose chunks do not hash to the catalog's sha256 leaves no model and no partial."""
    pkg = tmp_path / "pkgs" / "hostile_model_pkg"
    pkg.mkdir(parents=True)
    (pkg / "c0.bin").write_bytes(b"chunk zero ")
    (pkg / "c1.bin").write_bytes(b"chunk one")
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from pathlib import Path
        def chunk_paths():
            here = Path(__file__).parent
            return [here / "c0.bin", here / "c1.bin"]
    """))
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    models = tmp_path / "models"
    right = hashlib.sha256(b"chunk zero chunk one").hexdigest()
    with pytest.raises(ModelFileError, match="expected"):
        ensure_model(models, "m.gguf", hashlib.sha256(b"something else").hexdigest(), "hostile_model_pkg",
                     progress=False)
    assert sorted(p.name for p in models.iterdir()) == []
    assemble_from_package("hostile_model_pkg", models / "m.gguf", right, progress=False)
    assert is_verified(models / "m.gguf", right)
    sys.modules.pop("hostile_model_pkg", None)


def test_paths_named_in_requests_do_not_reach_files(served):
    for name in ("../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd", "/etc/passwd", "x\x00", MODEL + "/../" + MODEL):
        reply = served.request("GET", "/v1/models/" + name)
        error(reply, 404)
    error(post(served, json.dumps({"model": "../../etc/passwd", "messages": [{"role": "user", "content": "a"}]})
               .encode()), 404, "model")
