"""Real-world JSON Schemas through the grammar builder and llama.cpp's grammar engine.

The corpus: schemas emitted by pydantic v2 (Field constraints, nested models, enums, optionals,
recursive models, constrained lists and strings), the examples of OpenAI's structured-outputs
docs, and schemas as zod-to-json-schema writes them for the AI SDK. For each: the gateway accepts
it through `tools` and `response_format`; llama.cpp's engine, with the grammar built from it,
accepts valid instances and rejects the invalid ones a grammar can rule out; the invalid ones
only the check after generation can tell (number ranges, multipleOf, uniqueItems...) pass the
grammar and are caught by SchemaCheck.
"""

from __future__ import annotations

import json
from datetime import date, datetime
from enum import Enum, IntEnum
from typing import Annotated, Literal, Optional, Union
from uuid import UUID

import pytest
from pydantic import BaseModel, ConfigDict, Field, conlist, constr

from mesh.core.config import GatewayConfig, MeshConfig
from mesh.core.errors import ApiError
from mesh.gateway.tools import ToolShaper, content_violation, parse_tool_use
from mesh.gateway.validation import parse_chat
from shards.json_schema import (
    SchemaCheck,
    SchemaError,
    check_schema,
    integer_range,
    normalize_schema,
    pattern_grammar,
)
from shards.tools import MAX_GRAMMAR_CHARS, json_grammar

MODEL = MeshConfig().models[0].name


# -- the corpus: pydantic v2 ---------------------------------------------------------------------

class Weather(BaseModel):
    """LangChain's bind_tools example, as issue 16 found it."""
    city: str
    day: int = Field(ge=1, le=31)
    unit: Literal["c", "f"] = "c"


class Address(BaseModel):
    street: str = Field(min_length=1, max_length=40)
    zip: constr(pattern=r"^\d{5}$")


class Person(BaseModel):
    name: str = Field(min_length=1, max_length=20, description="full name")
    age: int = Field(gt=0, lt=150)
    address: Address
    tags: list[str] = Field(min_length=1, max_length=3)
    nickname: Optional[str] = None


class Color(str, Enum):
    red = "red"
    green = "green"


class Level(IntEnum):
    low = 1
    high = 2


class Paint(BaseModel):
    color: Color
    level: Level = Level.low
    shades: conlist(Color, min_length=0, max_length=2) = []


class Node(BaseModel):
    value: int
    children: list["Node"] = []


class Cat(BaseModel):
    pet_type: Literal["cat"]
    meows: int = Field(ge=0)


class Dog(BaseModel):
    pet_type: Literal["dog"]
    barks: float = Field(ge=0, le=10)


class Owner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pet: Union[Cat, Dog] = Field(discriminator="pet_type")
    scores: dict[str, int] = {}
    pair: tuple[int, str]
    when: datetime
    born: date
    id: UUID
    price: float = Field(gt=0, le=1000, multiple_of=0.5)
    code: Annotated[str, Field(pattern=r"^[A-Z]{2}-[0-9]{3}$")]


PYDANTIC = [
    ("pydantic-weather", Weather.model_json_schema(),
     [{"city": "Paris", "day": 5}, {"city": "Oslo", "day": 31, "unit": "f"}, {"city": "", "day": 1, "unit": "c"}],
     [{"city": "Paris", "day": 0}, {"city": "Paris", "day": 32}, {"city": "Paris", "day": 5, "unit": "k"},
      {"day": 5}, {"city": "Paris", "day": 5.5}, {"city": "Paris", "day": -3}],
     []),
    ("pydantic-person", Person.model_json_schema(),
     [{"name": "Ada", "age": 36, "address": {"street": "Main St", "zip": "12345"}, "tags": ["x"]},
      {"name": "B", "age": 149, "address": {"street": "s", "zip": "00000"}, "tags": ["a", "b", "c"], "nickname": None},
      {"name": "C", "age": 1, "address": {"street": "s", "zip": "99999"}, "tags": ["a"], "nickname": "cc"}],
     [{"name": "", "age": 36, "address": {"street": "s", "zip": "12345"}, "tags": ["x"]},
      {"name": "Ada", "age": 0, "address": {"street": "s", "zip": "12345"}, "tags": ["x"]},
      {"name": "Ada", "age": 150, "address": {"street": "s", "zip": "12345"}, "tags": ["x"]},
      {"name": "Ada", "age": 36, "address": {"street": "s", "zip": "1234"}, "tags": ["x"]},
      {"name": "Ada", "age": 36, "address": {"street": "s", "zip": "12345"}, "tags": []},
      {"name": "Ada", "age": 36, "address": {"street": "s", "zip": "12345"}, "tags": ["a", "b", "c", "d"]},
      {"name": "Ada", "age": 36, "address": {"street": "s", "zip": "12345"}, "tags": ["x"], "nickname": 3},
      {"name": "x" * 21, "age": 36, "address": {"street": "s", "zip": "12345"}, "tags": ["x"]}],
     []),
    ("pydantic-enums", Paint.model_json_schema(),
     [{"color": "red"}, {"color": "green", "level": 2, "shades": ["red", "red"]}, {"color": "red", "shades": []}],
     [{"color": "blue"}, {"color": "red", "level": 3}, {"color": "red", "shades": ["red", "green", "red"]}],
     []),
    ("pydantic-tree", Node.model_json_schema(),
     [{"value": 1}, {"value": 1, "children": [{"value": 2, "children": [{"value": 3, "children": []}]}]}],
     [{"value": "1"}, {"value": 1, "children": [{"children": []}]}, {"value": 1, "children": "x"}],
     []),
    ("pydantic-owner", Owner.model_json_schema(),
     [{"pet": {"pet_type": "cat", "meows": 3}, "pair": [1, "a"], "when": "2024-05-01T10:00:00Z",
       "born": "2000-02-29", "id": "123e4567-e89b-12d3-a456-426614174000", "price": 9.5, "code": "AB-123"},
      {"pet": {"pet_type": "dog", "barks": 2.5}, "scores": {"a": 1, "b": -2}, "pair": [0, ""],
       "when": "2024-05-01T10:00:00.123+02:00", "born": "1999-12-31", "id": "123E4567-E89B-12D3-A456-426614174000",
       "price": 1000, "code": "ZZ-000"}],
     [{"pet": {"pet_type": "cow"}, "pair": [1, "a"], "when": "2024-05-01T10:00:00Z", "born": "2000-02-29",
       "id": "123e4567-e89b-12d3-a456-426614174000", "price": 9.5, "code": "AB-123"},
      {"pet": {"pet_type": "cat", "meows": 3}, "pair": ["a", 1], "when": "2024-05-01T10:00:00Z",
       "born": "2000-02-29", "id": "123e4567-e89b-12d3-a456-426614174000", "price": 9.5, "code": "AB-123"},
      {"pet": {"pet_type": "cat", "meows": 3}, "pair": [1, "a"], "when": "yesterday", "born": "2000-02-29",
       "id": "123e4567-e89b-12d3-a456-426614174000", "price": 9.5, "code": "AB-123"},
      {"pet": {"pet_type": "cat", "meows": 3}, "pair": [1, "a"], "when": "2024-05-01T10:00:00Z",
       "born": "2000-02-29", "id": "not-a-uuid", "price": 9.5, "code": "AB-123"},
      {"pet": {"pet_type": "cat", "meows": 3}, "pair": [1, "a"], "when": "2024-05-01T10:00:00Z",
       "born": "2000-02-29", "id": "123e4567-e89b-12d3-a456-426614174000", "price": -1, "code": "AB-123"},
      {"pet": {"pet_type": "cat", "meows": 3}, "pair": [1, "a"], "when": "2024-05-01T10:00:00Z",
       "born": "2000-02-29", "id": "123e4567-e89b-12d3-a456-426614174000", "price": 9.5, "code": "ab-123"},
      {"pet": {"pet_type": "cat", "meows": -1}, "pair": [1, "a"], "when": "2024-05-01T10:00:00Z",
       "born": "2000-02-29", "id": "123e4567-e89b-12d3-a456-426614174000", "price": 9.5, "code": "AB-123"}],
     [{"pet": {"pet_type": "cat", "meows": 3}, "pair": [1, "a"], "when": "2024-05-01T10:00:00Z",
       "born": "2000-02-29", "id": "123e4567-e89b-12d3-a456-426614174000", "price": 1000.5, "code": "AB-123"},
      {"pet": {"pet_type": "cat", "meows": 3}, "pair": [1, "a"], "when": "2024-05-01T10:00:00Z",
       "born": "2000-02-29", "id": "123e4567-e89b-12d3-a456-426614174000", "price": 0.3, "code": "AB-123"},
      {"pet": {"pet_type": "dog", "barks": 11}, "pair": [1, "a"], "when": "2024-05-01T10:00:00Z",
       "born": "2000-02-29", "id": "123e4567-e89b-12d3-a456-426614174000", "price": 1, "code": "AB-123"}]),
]

# -- the corpus: OpenAI's structured-outputs docs ------------------------------------------------

MATH = {"type": "object", "properties": {
    "steps": {"type": "array", "items": {"type": "object", "properties": {
        "explanation": {"type": "string"}, "output": {"type": "string"}},
        "required": ["explanation", "output"], "additionalProperties": False}},
    "final_answer": {"type": "string"}}, "required": ["steps", "final_answer"], "additionalProperties": False}
UI = {"type": "object", "properties": {
    "type": {"type": "string", "description": "The type of the UI component",
             "enum": ["div", "button", "header", "section", "field", "form"]},
    "label": {"type": "string"},
    "children": {"type": "array", "items": {"$ref": "#"}},
    "attributes": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "value": {"type": "string"}},
        "required": ["name", "value"], "additionalProperties": False}}},
    "required": ["type", "label", "children", "attributes"], "additionalProperties": False}
LINKED = {"type": "object", "properties": {"linked_list": {"$ref": "#/$defs/linked_list_node"}},
          "$defs": {"linked_list_node": {"type": "object", "properties": {
              "value": {"type": "number"},
              "next": {"anyOf": [{"$ref": "#/$defs/linked_list_node"}, {"type": "null"}]}},
              "additionalProperties": False, "required": ["next", "value"]}},
          "additionalProperties": False, "required": ["linked_list"]}
WEATHER_STRICT = {"type": "object", "properties": {
    "location": {"type": "string", "description": "City and country e.g. Bogotá, Colombia"},
    "units": {"type": ["string", "null"], "enum": ["celsius", "fahrenheit"]}},
    "required": ["location", "units"], "additionalProperties": False}
SUPPORTED = {"type": "object", "properties": {
    "name": {"type": "string"},
    "username": {"type": "string", "pattern": "^@[a-zA-Z0-9_]+$"},
    "email": {"type": "string", "format": "email"},
    "value": {"type": "number", "minimum": 0, "maximum": 100},
    "items": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2}},
    "required": ["name", "username", "email", "value", "items"], "additionalProperties": False}

OPENAI = [
    ("openai-math", MATH,
     [{"steps": [{"explanation": "8x = -23 - 7", "output": "8x = -30"}], "final_answer": "x = -3.75"},
      {"steps": [], "final_answer": ""}],
     [{"steps": [{"explanation": "e"}], "final_answer": "x"}, {"final_answer": "x"}], []),
    ("openai-ui", UI,
     [{"type": "form", "label": "Sign up", "children": [
         {"type": "field", "label": "Name", "children": [], "attributes": [{"name": "id", "value": "n"}]}],
       "attributes": []}],
     [{"type": "span", "label": "x", "children": [], "attributes": []},
      {"type": "div", "label": "x", "children": [{"type": "div"}], "attributes": []}], []),
    ("openai-linked-list", LINKED,
     [{"linked_list": {"value": 1, "next": {"value": 2.5, "next": None}}}],
     [{"linked_list": {"value": 1}}, {"linked_list": {"value": 1, "next": {"value": "2", "next": None}}}], []),
    ("openai-weather-strict", WEATHER_STRICT,
     [{"location": "Bogotá, Colombia", "units": "celsius"}, {"location": "Paris", "units": "fahrenheit"}],
     [{"location": "Paris", "units": "kelvin"}, {"location": "Paris"}, {"location": "Paris", "units": None}], []),
    ("openai-supported", SUPPORTED,
     [{"name": "A", "username": "@ada_1", "email": "ada@example.com", "value": 99.5, "items": ["x"]}],
     [{"name": "A", "username": "ada", "email": "ada@example.com", "value": 1, "items": ["x"]},
      {"name": "A", "username": "@ada", "email": "not an email", "value": 1, "items": ["x"]},
      {"name": "A", "username": "@ada", "email": "ada@example.com", "value": -1, "items": ["x"]},
      {"name": "A", "username": "@ada", "email": "ada@example.com", "value": 1, "items": []},
      {"name": "A", "username": "@ada", "email": "ada@example.com", "value": 1, "items": ["a", "b", "c"]}],
     [{"name": "A", "username": "@ada", "email": "ada@example.com", "value": 100.5, "items": ["x"]}]),
]

# -- the corpus: zod-to-json-schema, as the AI SDK sends it --------------------------------------

ZOD_RECIPE = {"type": "object", "properties": {"recipe": {"type": "object", "properties": {
    "name": {"type": "string"},
    "ingredients": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "amount": {"type": "string"}},
        "required": ["name", "amount"], "additionalProperties": False}},
    "steps": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "ingredients", "steps"], "additionalProperties": False}},
    "required": ["recipe"], "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}
# z.object({ rating: z.number().int().min(1).max(10), email: z.string().email(), code: z.string().min(2).max(5),
#   price: z.number().positive(), id: z.string().uuid(), at: z.string().datetime(), kind: z.enum(["a", "b"]),
#   tags: z.array(z.string()).nonempty(), note: z.string().nullable(), slug: z.string().regex(/^[a-z]+$/),
#   extra: z.string().optional(), count: z.number().int().nonnegative().default(0) })
ZOD_CONSTRAINED = {"type": "object", "properties": {
    "rating": {"type": "integer", "minimum": 1, "maximum": 10},
    "email": {"type": "string", "format": "email"},
    "code": {"type": "string", "minLength": 2, "maxLength": 5},
    "price": {"type": "number", "exclusiveMinimum": 0},
    "id": {"type": "string", "format": "uuid"},
    "at": {"type": "string", "format": "date-time"},
    "kind": {"type": "string", "enum": ["a", "b"]},
    "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
    "note": {"type": ["string", "null"]},
    "slug": {"type": "string", "pattern": "^[a-z]+$"},
    "extra": {"type": "string"},
    "count": {"type": "integer", "minimum": 0, "default": 0}},
    "required": ["rating", "email", "code", "price", "id", "at", "kind", "tags", "note", "slug"],
    "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}
# const Category = z.lazy(() => z.object({ name: z.string(), subcategories: z.array(Category) }))
ZOD_RECURSIVE = {"$ref": "#/definitions/Category", "definitions": {"Category": {
    "type": "object", "properties": {"name": {"type": "string"},
                                     "subcategories": {"type": "array", "items": {"$ref": "#/definitions/Category"}}},
    "required": ["name", "subcategories"], "additionalProperties": False}},
    "$schema": "http://json-schema.org/draft-07/schema#"}

_ZOD_OK = {"rating": 7, "email": "a@b.io", "code": "ab", "price": 0.01, "id": "123e4567-e89b-12d3-a456-426614174000",
           "at": "2024-01-02T03:04:05Z", "kind": "a", "tags": ["t"], "note": None, "slug": "abc"}
ZOD = [
    ("zod-recipe", ZOD_RECIPE,
     [{"recipe": {"name": "Lasagna", "ingredients": [{"name": "pasta", "amount": "500 g"}], "steps": ["Boil"]}}],
     [{"recipe": {"name": "L", "ingredients": [{"name": "pasta"}], "steps": []}}], []),
    ("zod-constrained", ZOD_CONSTRAINED,
     [_ZOD_OK, {**_ZOD_OK, "rating": 10, "code": "abcde", "note": "n", "extra": "e", "count": 0}],
     [{**_ZOD_OK, "rating": 0}, {**_ZOD_OK, "rating": 11}, {**_ZOD_OK, "code": "a"}, {**_ZOD_OK, "code": "abcdef"},
      {**_ZOD_OK, "price": -1}, {**_ZOD_OK, "kind": "c"}, {**_ZOD_OK, "tags": []}, {**_ZOD_OK, "slug": "AB"},
      {**_ZOD_OK, "count": -1}, {**_ZOD_OK, "id": "x"}],
     [{**_ZOD_OK, "price": 0}]),
    ("zod-recursive", ZOD_RECURSIVE,
     [{"name": "a", "subcategories": [{"name": "b", "subcategories": []}]}],
     [{"name": "a", "subcategories": [{"name": "b"}]}], []),
]

CORPUS = PYDANTIC + OPENAI + ZOD


def text(value) -> str:
    return json.dumps(value, ensure_ascii=False)


# -- through llama.cpp's grammar engine ----------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from tests.unit.grammar_engine import GrammarEngine, vocab_gguf

    loaded = GrammarEngine(vocab_gguf(tmp_path_factory.mktemp("vocab") / "vocab.gguf"))
    yield loaded
    loaded.close()


@pytest.mark.parametrize("name, schema, valid, ruled_out, checked_after", CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus_grammar_accepts_valid_and_rejects_invalid(engine, name, schema, valid, ruled_out, checked_after):
    check_schema(schema)
    grammar = json_grammar(normalize_schema(schema))
    assert len(grammar) < MAX_GRAMMAR_CHARS
    check = SchemaCheck(schema)
    for value in valid:
        assert check.violation(value) is None, (value, check.violation(value))
        assert engine.accepts(grammar, text(value)), f"{name}: the grammar refuses a valid {text(value)}"
        assert engine.accepts(grammar, json.dumps(value, separators=(",", ":"))), "compact JSON too"
    for value in ruled_out:
        assert check.violation(value) is not None, value
        assert not engine.accepts(grammar, text(value)), f"{name}: the grammar allows an invalid {text(value)}"
    for value in checked_after:
        assert engine.accepts(grammar, text(value)), value
        assert check.violation(value) is not None, f"{name}: the check after generation misses {text(value)}"


@pytest.mark.parametrize("name, schema, valid, ruled_out, checked_after", CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus_is_accepted_through_tools_and_response_format(name, schema, valid, ruled_out, checked_after):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    params = schema if normalize_schema(schema).get("type") == "object" or "$ref" in schema else None
    if params is not None:
        use = parse_chat({**body, "tools": [{"type": "function", "function": {"name": "f", "parameters": params}}],
                          "tool_choice": "required"}, GatewayConfig()).tool_use
        assert use.grammar and use.calls
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    use = parse_chat({**body, "response_format": fmt}, GatewayConfig()).tool_use
    assert use.grammar and use.content_check is not None
    assert content_violation(use, text(valid[0])) is None
    bad = (ruled_out + checked_after)[0]
    assert "does not match" in content_violation(use, text(bad))


def test_tool_call_arguments_are_parsed_and_the_grammar_enforces_them(engine):
    use = parse_tool_use({"tools": [{"type": "function", "function": {
        "name": "get_weather", "parameters": Weather.model_json_schema()}}], "tool_choice": "required"})
    ok = '{"name": "get_weather", "arguments": {"city": "Oslo", "day": 31}}'
    assert engine.accepts(use.grammar, ok)
    assert not engine.accepts(use.grammar, ok.replace("31", "32"))
    shaper = ToolShaper(use)
    shaper.feed(ok)
    assert shaper.finish() == [] and shaper.message()["refusal"] is None


# -- the check after generation: reported, never hidden -------------------------------------------

def test_a_violation_only_the_check_sees_is_a_refusal_not_an_error():
    schema = {"type": "object", "properties": {"n": {"type": "number", "multipleOf": 3},
                                               "xs": {"type": "array", "uniqueItems": True}}, "required": ["n"]}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    use = parse_tool_use({"tools": [tool], "tool_choice": "required"})
    shaper = ToolShaper(use)
    shaper.feed('{"name": "f", "arguments": {"n": 4, "xs": [1, 1]}}')
    deltas = shaper.finish()
    assert deltas[-1]["refusal"].startswith("The arguments of f do not match its parameters schema:")
    message = shaper.message()
    assert message["refusal"] == deltas[-1]["refusal"] and message["tool_calls"][0]["function"]["name"] == "f"
    assert shaper.finish_reason("stop") == "tool_calls"
    good = ToolShaper(use)
    good.feed('{"name": "f", "arguments": {"n": 6, "xs": [1, 2]}}')
    assert good.finish() == [] and good.message()["refusal"] is None
    fmt = parse_tool_use({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert "(at /n)" in content_violation(fmt, '{"n": 4}')
    assert content_violation(fmt, '{"n": 9}') is None
    assert content_violation(fmt, '{"n": 9') == ("The answer does not match the response_format schema: "
                                                 "the answer is not valid JSON")


# -- what is still a 400 -------------------------------------------------------------------------

@pytest.mark.parametrize("schema, words", [
    ({"type": "tuple"}, "not a valid JSON Schema"),
    ({"type": "string", "minLength": -1}, "not a valid JSON Schema"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": "3"}}}, "not a valid JSON Schema"),
    ({"type": "object", "required": "a"}, "not a valid JSON Schema"),
    ({"$ref": "https://example.com/s.json"}, "only local references"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "points nowhere"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer"),
    ({"type": "object", "properties": {"a": False}, "required": ["a"]}, "no value satisfies"),
    ({"enum": []}, "non-empty"),
])
def test_what_is_not_json_schema_or_cannot_be_satisfied_is_400(schema, words):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    with pytest.raises(ApiError) as err:
        parse_chat(body, GatewayConfig())
    assert err.value.status == 400 and err.value.param == "response_format.json_schema.schema"
    assert words in err.value.message, err.value.message


# -- the pieces ----------------------------------------------------------------------------------

@pytest.mark.parametrize("low, high", [(1, 31), (0, 0), (-5, 120), (-1000, -10), (7, 7), (99, 1001), (0, 10**6),
                                       (-(10**16 - 1), 10**16 - 1), (10, 19)])
def test_integer_ranges_are_exact(engine, low, high):
    grammar = f"root ::= {integer_range(low, high)}"
    inside = {low, high, (low + high) // 2, max(low, 0) if low <= 0 <= high else low}
    outside = {low - 1, high + 1, low - 10, high + 10}
    for n in inside:
        assert engine.accepts(grammar, str(n)), (n, grammar)
    for n in outside:
        assert not engine.accepts(grammar, str(n)), (n, grammar)
    for leading in ("0" + str(abs(low)), "-0"):
        assert leading == "0" or not engine.accepts(grammar, leading)


def test_integer_ranges_exhaustively_below_a_thousand(engine):
    for low, high in ((3, 47), (0, 99), (-12, 5), (100, 250)):
        grammar = f"root ::= {integer_range(low, high)}"
        for n in range(-300, 300, 1) if high < 200 else range(0, 400, 3):
            assert engine.accepts(grammar, str(n)) == (low <= n <= high), (n, low, high)


@pytest.mark.parametrize("pattern, good, bad", [
    (r"^\d{5}$", ["12345"], ["1234", "123456", "abcde"]),
    (r"^[A-Z]{2}-[0-9]{3}$", ["AB-123"], ["ab-123", "AB123"]),
    (r"^@[a-zA-Z0-9_]+$", ["@a_1"], ["a", "@", "@a b"]),
    (r"^(foo|bar)+baz?$", ["foobarba", "foobaz"], ["baz", "fooba_"]),
    (r"^[^,]+$", ["a b.c"], ["a,b", ""]),
    (r"^a.c$", ["abc", "a-c"], ["ac", "abbc"]),
    (r"ab", ["ab", "xxabyy"], ["a", "ba"]),
    (r'^say "(hi|yo)"$', ['say "hi"'], ['say hi']),
    (r"^\w+@\w+\.com$", ["a@b.com"], ["a@b.org"]),
    (r"^(?:x|y){2,3}$", ["xy", "yyy"], ["x", "xxxx"]),
])
def test_patterns_translate_exactly(engine, pattern, good, bad):
    schema = {"type": "string", "pattern": pattern}
    grammar = json_grammar(normalize_schema(schema))
    assert normalize_schema(schema).get("pattern") == pattern, "it translates"
    for s in good:
        assert engine.accepts(grammar, json.dumps(s)), (pattern, s)
    for s in bad:
        assert not engine.accepts(grammar, json.dumps(s)), (pattern, s)


@pytest.mark.parametrize("pattern", [r"^(?=a)b$", r"^(a)\1$", r"\bword\b", r"^a|b$", r"(?i)abc"])
def test_patterns_that_do_not_translate_are_checked_after(pattern):
    assert pattern_grammar(pattern) is None
    assert normalize_schema({"type": "string", "pattern": pattern}) == {"type": "string"}


def test_every_grammar_of_the_corpus_parses_in_llama_cpp_and_stays_small(engine):
    for name, schema, *_ in CORPUS:
        grammar = json_grammar(normalize_schema(schema))
        assert engine.parses(grammar), name
        assert len(grammar) < 20_000, (name, len(grammar))


def test_big_but_valid_bounds_are_checked_after_not_refused():
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 100_000},
                                               "xs": {"type": "array", "minItems": 500, "items": {"type": "integer"}}}}
    out = normalize_schema(schema)
    assert out["properties"]["s"] == {"type": "string"}
    assert out["properties"]["xs"]["minItems"] <= 64
    assert len(json_grammar(out)) < 5000


def test_unanchored_format_and_length_together_keep_the_format():
    out = normalize_schema({"type": "string", "format": "date", "maxLength": 10})
    assert out == {"type": "string", "format": "date"}
    with pytest.raises(SchemaError):
        normalize_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}})
