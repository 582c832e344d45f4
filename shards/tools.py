"""Tool calls and JSON output through grammar-constrained decoding.

A JSON schema (a function's parameters, or a response_format schema) is first reduced to the
subset the grammar builder enforces exactly (`normalize_schema`: anything it would silently
ignore, like `minimum` or `pattern`, is refused), then turned into a llama.cpp GBNF grammar with
llama-cpp-python's own schema converter. The grammar travels with the request (Sampling.grammar)
to whichever replica runs it.

The model writes a tool call as one JSON object per line:

    {"name": "get_weather", "arguments": {"city": "Paris"}}

The grammar forces that shape, the function names and each function's parameters schema. With
tool_choice "auto" it also allows plain text that does not start with "{". `CallParser` reads the
model's text incrementally, so a stream can release each call's arguments as they are generated.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_DEPTH = 16  # nesting of subschemas
MAX_NODES = 2000  # subschemas, after $ref inlining
MAX_STRING_LENGTH = 1000  # bound on minLength/maxLength: each unit becomes a grammar rule
MAX_ITEMS = 64  # bound on minItems/maxItems, for the same reason
MAX_GRAMMAR_CHARS = 256 * 1024
MAX_PARALLEL_CALLS = 8

_TYPES = ("string", "integer", "number", "boolean", "null", "object", "array")
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
                          "writeOnly", "$schema", "$id", "$defs", "definitions", "strict"})
_ENFORCED_FORMATS = ("date", "time", "date-time", "uuid")
_BY_TYPE = {
    "string": {"minLength", "maxLength", "format"},
    "integer": set(),
    "number": set(),
    "boolean": set(),
    "null": set(),
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems", "uniqueItems"},
}
# JSON string characters: no raw control characters (json.loads refuses them), escapes as in JSON.
_CHAR_RULE = r'[^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'


class SchemaError(ValueError):
    """A schema the grammar builder cannot enforce; `path` says where (JSON-pointer style)."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(f"{message} (at {path or '/'})")
        self.path = path


# -- schemas --------------------------------------------------------------------------------------

def normalize_schema(schema: Any, *, require_object: bool = False) -> dict:
    """The schema reduced to what the grammar enforces: local $refs inlined, annotations dropped,
    every remaining keyword one the converter honours. Raises SchemaError for anything else."""
    if not isinstance(schema, dict):
        raise SchemaError("a schema must be a JSON object")
    walker = _Normalizer(schema)
    out = walker.visit(schema, "", 0)
    if require_object and out.get("type") != "object":
        raise SchemaError("function parameters must be a schema of type 'object'")
    return out


class _Normalizer:
    def __init__(self, root: dict) -> None:
        self.root = root
        self.nodes = 0
        self.resolving: list[str] = []

    def visit(self, schema: Any, path: str, depth: int) -> dict:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise SchemaError(f"the schema is too large (more than {MAX_NODES} subschemas)", path)
        if depth > MAX_DEPTH:
            raise SchemaError(f"the schema is nested too deeply (more than {MAX_DEPTH} levels)", path)
        if schema is True or schema == {}:
            return {"type": list(_TYPES)}
        if not isinstance(schema, dict):
            raise SchemaError("a subschema must be an object or true", path)
        keys = {k for k in schema if k not in _ANNOTATIONS}
        if "$ref" in keys:
            return self._ref(schema, keys, path, depth)
        for combiner in ("anyOf", "oneOf", "allOf"):
            if combiner in keys:
                return self._combined(schema, combiner, keys, path, depth)
        if "const" in keys or "enum" in keys:
            return self._constants(schema, keys, path)
        kind = schema.get("type")
        if kind is None:
            kind = self._infer(keys)
        if isinstance(kind, list):
            return self._union_of_types(schema, kind, path, depth)
        if kind not in _TYPES:
            raise SchemaError(f"unknown type {kind!r}", path)
        extra = keys - {"type"} - _BY_TYPE[kind]
        if extra:
            raise SchemaError(f"unsupported keyword(s) for type {kind!r}: {', '.join(sorted(extra))}", path)
        return getattr(self, f"_{kind}")(schema, path, depth) if kind in ("string", "object", "array") \
            else {"type": kind}

    def _infer(self, keys: set[str]) -> Any:
        if keys & _BY_TYPE["object"]:
            return "object"
        if keys & _BY_TYPE["array"]:
            return "array"
        if keys & _BY_TYPE["string"]:
            return "string"
        if keys:
            raise SchemaError(f"unsupported keyword(s): {', '.join(sorted(keys))}")
        return list(_TYPES)

    def _ref(self, schema: dict, keys: set[str], path: str, depth: int) -> dict:
        ref = schema["$ref"]
        if keys != {"$ref"}:
            raise SchemaError("$ref alongside other keywords is not supported", path)
        match = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", ref) if isinstance(ref, str) else None
        if match is None:
            raise SchemaError(f"only local references like '#/$defs/Name' are supported; got {ref!r}", path)
        target = (self.root.get(match.group(1)) or {}).get(match.group(2)) \
            if isinstance(self.root.get(match.group(1)), dict) else None
        if target is None:
            raise SchemaError(f"$ref {ref!r} points nowhere", path)
        if ref in self.resolving:
            raise SchemaError(f"recursive $ref {ref!r} is not supported", path)
        self.resolving.append(ref)
        try:
            return self.visit(target, f"{path}/$ref", depth + 1)
        finally:
            self.resolving.pop()

    def _combined(self, schema: dict, combiner: str, keys: set[str], path: str, depth: int) -> dict:
        branches = schema[combiner]
        if keys - {combiner, "type"} or not isinstance(branches, list) or not branches:
            raise SchemaError(f"{combiner} must be a non-empty list with no sibling keywords", path)
        if combiner == "allOf":
            if len(branches) != 1:
                raise SchemaError("allOf with more than one schema is not supported", path)
            return self.visit(branches[0], f"{path}/allOf/0", depth + 1)
        # oneOf is generated as anyOf: exact when the branches are disjoint (discriminated unions)
        return {"anyOf": [self.visit(b, f"{path}/{combiner}/{i}", depth + 1) for i, b in enumerate(branches)]}

    def _constants(self, schema: dict, keys: set[str], path: str) -> dict:
        if keys - {"const", "enum", "type"} or {"const", "enum"} <= keys:
            raise SchemaError("const and enum take no other constraints", path)
        if "const" in keys:
            _check_json(schema["const"], path)
            return {"const": schema["const"]}
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise SchemaError("enum must be a non-empty list", path)
        _check_json(values, path)
        return {"enum": values}

    def _union_of_types(self, schema: dict, kinds: list, path: str, depth: int) -> dict:
        if not kinds or len(set(map(str, kinds))) != len(kinds) or any(k not in _TYPES for k in kinds):
            raise SchemaError(f"type must be one of {', '.join(_TYPES)} or a list of them", path)
        keys = {k for k in schema if k not in _ANNOTATIONS} - {"type"}
        allowed = set().union(*(_BY_TYPE[k] for k in kinds))
        if keys - allowed:
            raise SchemaError(f"unsupported keyword(s): {', '.join(sorted(keys - allowed))}", path)
        if len(kinds) == 1:
            return self.visit({**schema, "type": kinds[0]}, path, depth)
        return {"anyOf": [self.visit({k: v for k, v in schema.items() if k in _BY_TYPE[t]} | {"type": t},
                                     path, depth + 1) for t in kinds]}

    def _string(self, schema: dict, path: str, depth: int) -> dict:
        out: dict = {"type": "string"}
        fmt = schema.get("format")
        if fmt is not None and not isinstance(fmt, str):
            raise SchemaError("format must be a string", path)
        low, high = _bound(schema, "minLength", path, MAX_STRING_LENGTH), _bound(schema, "maxLength", path,
                                                                               MAX_STRING_LENGTH)
        if fmt in _ENFORCED_FORMATS:
            if low is not None or high is not None:
                raise SchemaError(f"format {fmt!r} with minLength/maxLength is not supported", path)
            out["format"] = fmt  # other formats are annotations (JSON Schema's default): any string
        if low is not None and high is not None and low > high:
            raise SchemaError("minLength is greater than maxLength", path)
        if low is not None:
            out["minLength"] = low
        if high is not None:
            out["maxLength"] = high
        return out

    def _object(self, schema: dict, path: str, depth: int) -> dict:
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise SchemaError("properties must be an object", path)
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required) \
                or len(set(required)) != len(required):
            raise SchemaError("required must be a list of distinct strings", path)
        missing = [r for r in required if r not in props]
        if missing:
            raise SchemaError(f"required names properties that are not defined: {', '.join(missing)}", path)
        out: dict = {"type": "object",
                     "properties": {name: self.visit(sub, f"{path}/properties/{_escape(name)}", depth + 1)
                                    for name, sub in props.items()}}
        if required:
            out["required"] = list(required)
        extra = schema.get("additionalProperties")
        if extra is not None and not isinstance(extra, (bool, dict)):
            raise SchemaError("additionalProperties must be a boolean or a schema", path)
        if "properties" not in schema and extra is not False:
            # A map (or any object): free keys, their values as the schema says.
            if isinstance(extra, dict) and extra:
                out["additionalProperties"] = self.visit(extra, f"{path}/additionalProperties", depth + 1)
                del out["properties"]
            else:
                return {"type": "object"}
        # With declared properties only those are generated (a subset of what the schema allows:
        # extra keys could repeat a declared name with a value of the wrong type).
        return out

    def _array(self, schema: dict, path: str, depth: int) -> dict:
        items = schema.get("items", True)
        if isinstance(items, list):
            raise SchemaError("tuple-style items are not supported", path)
        if schema.get("uniqueItems") not in (None, False):
            raise SchemaError("uniqueItems is not supported", path)
        low = _bound(schema, "minItems", path, MAX_ITEMS) or 0
        high = _bound(schema, "maxItems", path, MAX_ITEMS)
        if high is not None and low > high:
            raise SchemaError("minItems is greater than maxItems", path)
        out = {"type": "array", "items": self.visit(items, f"{path}/items", depth + 1), "minItems": low}
        if high is not None:
            out["maxItems"] = high
        return out


def _bound(schema: dict, key: str, path: str, limit: int) -> int | None:
    value = schema.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise SchemaError(f"{key} must be an integer between 0 and {limit}", path)
    return value


def _check_json(value: Any, path: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        raise SchemaError("constants must be finite JSON values", path) from None


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


# -- grammars -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # as the client sent it (shown to the model)
    normalized: dict  # what the grammar enforces


def json_grammar(schema: dict | None) -> str:
    """Any JSON object (schema None), or a value of a normalized schema."""
    conv = _converter()
    root = conv.visit(schema if schema is not None else {"type": "object"}, "content")
    return _finish(conv, f"root ::= {root}")


def tool_grammar(tools: tuple[Tool, ...], choice: str, *, parallel: bool = False,
                 content_schema: dict | None = None, json_content: bool = False) -> str:
    """Tool calls, one per line: `choice` "required", "auto" (calls, or else text not starting
    with "{", or else JSON content when `json_content`), or a function's name (that one only)."""
    chosen = tools if choice in ("auto", "required") else tuple(t for t in tools if t.name == choice)
    if not chosen:
        raise ValueError(f"no tool named {choice!r}")
    conv = _converter()
    calls = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.normalized},
              "required": ["name", "arguments"]} for t in chosen]
    call = conv.visit(calls[0] if len(calls) == 1 else {"anyOf": calls}, "call")
    more = MAX_PARALLEL_CALLS - 1 if parallel else 0
    lines = [f"tool-calls ::= {call}" + (f' ("\\n" {call}){{0,{more}}}' if more else "")]
    if choice != "auto":
        root = "root ::= tool-calls"
    elif json_content:
        content = conv.visit(content_schema if content_schema is not None else {"type": "object"}, "content")
        root = f"root ::= tool-calls | {content}"
    else:
        root = "root ::= tool-calls | text"
        lines.append("text ::= [^{] .*")
    return _finish(conv, "\n".join([root, *lines]))


def _finish(conv: Any, head: str) -> str:
    grammar = head + "\n" + conv.format_grammar() + "\n"
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise SchemaError(f"the schema makes a grammar of {len(grammar)} characters (limit {MAX_GRAMMAR_CHARS}); "
                          f"simplify it")
    return grammar


def _converter() -> Any:
    """llama-cpp-python's schema converter, with two fixes of its Python port: string literals
    escape backslashes, and JSON strings exclude raw control characters."""
    from llama_cpp.llama_grammar import BuiltinRule, SchemaConverter

    class Converter(SchemaConverter):
        def _format_literal(self, literal: str) -> str:
            escaped = literal.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
            return f'"{escaped}"'

        def _add_primitive(self, name: str, rule: Any) -> str:
            if name == "char":
                rule = BuiltinRule(_CHAR_RULE, [])
            return super()._add_primitive(name, rule)

    return Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


# -- prompts --------------------------------------------------------------------------------------

def call_text(name: str, arguments: str) -> str:
    """One call as the model writes it (and as earlier calls appear in the conversation)."""
    return f'{{"name": {json.dumps(name)}, "arguments": {arguments}}}'


def tools_preamble(tools: tuple[Tool, ...], choice: str, parallel: bool = False) -> str:
    listing = "\n".join(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters},
                                   ensure_ascii=False) for t in tools)
    rules = ("To call a function, reply with a JSON object on one line: "
             '{"name": <function name>, "arguments": <object of arguments>}, and nothing else.')
    if parallel:
        rules += " To call several functions, put each call on its own line."
    if choice == "auto":
        rules += " If no function is needed, answer in plain text instead."
    elif choice == "required":
        rules += " You must call at least one function."
    else:
        rules += f" You must call the function {choice}."
    return f"You can call these functions:\n{listing}\n\n{rules}"


def json_preamble(schema: Any | None) -> str:
    if schema is None:
        return "Reply with a JSON object only."
    return f"Reply with a JSON object only, matching this JSON schema:\n{json.dumps(schema, ensure_ascii=False)}"


def tool_result_text(name: str | None, content: str) -> str:
    head = f"Result of {name}:" if name else "Function result:"
    return f"{head}\n{content}"


# -- reading the model's output -------------------------------------------------------------------

@dataclass(frozen=True)
class TextOut:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    name: str


@dataclass(frozen=True)
class ArgsOut:
    index: int
    text: str


_WS = " \t\n\r"


class CallParser:
    """Splits the model's text into plain text or tool calls, as it arrives.

    Follows the grammar of `tool_grammar`: with `allow_text` (tool_choice "auto") output that
    does not start with "{" is content; otherwise it is calls, one per line. A call's header
    (`{"name": "f", "arguments": `) is held back until complete, then its arguments are released
    as they come. Output that turns out not to be a call (possible only from a backend that
    ignores grammars) becomes content when text is allowed and is dropped otherwise.
    """

    def __init__(self, names: tuple[str, ...], allow_text: bool) -> None:
        self._names = names
        self._allow_text = allow_text
        self._state = "start"  # start | header | args | close | between | text | ignored
        self._held = ""  # a header being matched
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self.calls: list[tuple[str, str]] = []  # (name, arguments so far)
        self.text = ""

    @property
    def complete(self) -> bool:
        """The output so far is whole calls (or plain text)."""
        return self._state in ("text", "between")

    def feed(self, text: str) -> list[TextOut | CallStart | ArgsOut]:
        out: list[TextOut | CallStart | ArgsOut] = []
        args = ""
        for ch in text:
            if self._state == "args":
                if self._in_value(ch):
                    args += ch
                continue
            if args:
                out.append(self._args(args))
                args = ""
            out.extend(self._step(ch))
        if args:
            out.append(self._args(args))
        return _merge(out)

    def finish(self) -> list[TextOut | CallStart | ArgsOut]:
        """The end of the output: a header that never completed becomes text, if text is allowed."""
        if self._state == "header" and not self.calls and self._allow_text:
            return self._become_text()
        return []

    def _args(self, text: str) -> ArgsOut:
        index = len(self.calls) - 1
        name, sofar = self.calls[index]
        self.calls[index] = (name, sofar + text)
        return ArgsOut(index, text)

    def _in_value(self, ch: str) -> bool:
        """Tracks the arguments object; True if `ch` belongs to it."""
        if self._depth == 0 and not self._in_string:
            if ch in _WS:
                return False  # before the object starts
            if ch not in "{[":
                self._state = "ignored"  # arguments must be an object: the grammar says so
                return False
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == '"':
                self._in_string = False
        elif ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            if self._depth == 0:
                self._state = "close"
        return True

    def _step(self, ch: str) -> list[TextOut | CallStart | ArgsOut]:
        state = self._state
        if state == "text":
            self.text += ch
            return [TextOut(ch)]
        if state == "ignored":
            return []
        if state == "close":  # after a call's arguments: spaces, then the call's "}"
            if ch == "}":
                self._state = "between"
            elif ch not in _WS:
                self._state = "ignored"
            return []
        if state in ("start", "between"):
            if ch == "{":
                self._held, self._state = ch, "header"
                return []
            if state == "start" and self._allow_text:
                self._held, self._state = ch, "header"
                return self._become_text()
            if ch not in _WS:
                self._state = "ignored"
            return []
        self._held += ch  # header
        verdict = self._match_header()
        if verdict is None:
            return []
        if verdict is False:
            if self.calls or not self._allow_text:
                self._state = "ignored"
                return []
            return self._become_text()
        self.calls.append((verdict, ""))
        self._held, self._state, self._depth = "", "args", 0
        self._in_string = self._escaped = False
        return [CallStart(len(self.calls) - 1, verdict)]

    def _match_header(self) -> str | bool | None:
        """The function name once the held text is a whole header; None while it may still become
        one; False when it cannot."""
        undecided = False
        for name in self._names:
            result = _match_parts(self._held, ("{", '"name"', ":", json.dumps(name), ",", '"arguments"', ":"))
            if result is True:
                return name
            undecided = undecided or result is None
        return None if undecided else False

    def _become_text(self) -> list[TextOut | CallStart | ArgsOut]:
        held, self._held, self._state = self._held, "", "text"
        self.text += held
        return [TextOut(held)]


def _match_parts(text: str, parts: tuple[str, ...]) -> bool | None:
    """Whether `text` is `parts` joined by optional whitespace (True), a prefix of that (None),
    or neither (False)."""
    i = 0
    for part in parts:
        while i < len(text) and text[i] in _WS:
            i += 1
        if i == len(text):
            return None
        chunk = text[i:i + len(part)]
        if not part.startswith(chunk):
            return False
        if len(chunk) < len(part):
            return None
        i += len(part)
    return True if i == len(text) else False


def _merge(events: list) -> list:
    """Adjacent text (or the same call's argument) events joined into one."""
    out: list = []
    for e in events:
        last = out[-1] if out else None
        if isinstance(e, TextOut) and isinstance(last, TextOut):
            out[-1] = TextOut(last.text + e.text)
        elif isinstance(e, ArgsOut) and isinstance(last, ArgsOut) and last.index == e.index:
            out[-1] = ArgsOut(e.index, last.text + e.text)
        else:
            out.append(e)
    return out
