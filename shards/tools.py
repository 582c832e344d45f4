"""Tool calls and JSON output through grammar-constrained decoding.

A JSON schema (a function's parameters, or a response_format schema) is checked against its
metaschema, reduced to what a grammar enforces (`normalize_schema`) and written as a llama.cpp
GBNF grammar (shards/json_schema.py, the entry point of the json_schema_* modules, has all
three, and the check of an answer after generation for what the grammar cannot enforce). The
grammar travels with the request (Sampling.grammar) to whichever replica runs it.

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

from shards.json_schema import (  # noqa: F401 - re-exported: the schema half of tool calling
    MAX_DEPTH,
    MAX_ITEMS,
    MAX_NODES,
    MAX_STRING_LENGTH,
    GrammarBuilder,
    SchemaCheck,
    SchemaError,
    check_schema,
    normalize_schema,
)

NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_GRAMMAR_CHARS = 256 * 1024
MAX_PARALLEL_CALLS = 8


# -- grammars -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # as the client sent it (shown to the model)
    normalized: dict  # what the grammar enforces


def json_grammar(schema: dict | None) -> str:
    """Any JSON object (schema None), or a value of a grammar schema (normalize_schema's)."""
    builder = GrammarBuilder()
    root = builder.visit(schema if schema is not None else {"type": "object"}, "content")
    return _finish(builder, f"root ::= {root}")


def tool_grammar(tools: tuple[Tool, ...], choice: str, *, parallel: bool = False,
                 content_schema: dict | None = None, json_content: bool = False) -> str:
    """Tool calls, one per line: `choice` "required", "auto" (calls, or else text not starting
    with "{", or else JSON content when `json_content`), or a function's name (that one only)."""
    chosen = tools if choice in ("auto", "required") else tuple(t for t in tools if t.name == choice)
    if not chosen:
        raise ValueError(f"no tool named {choice!r}")
    builder = GrammarBuilder()
    calls = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.normalized},
              "required": ["name", "arguments"]} for t in chosen]
    call = builder.visit(calls[0] if len(calls) == 1 else {"anyOf": calls}, "call")
    more = MAX_PARALLEL_CALLS - 1 if parallel else 0
    lines = [f"tool-calls ::= {call}" + (f' ("\\n" {call}){{0,{more}}}' if more else "")]
    if choice != "auto":
        root = "root ::= tool-calls"
    elif json_content:
        content = builder.visit(content_schema if content_schema is not None else {"type": "object"}, "content")
        root = f"root ::= tool-calls | {content}"
    else:
        root = "root ::= tool-calls | text"
        lines.append("text ::= [^{] .*")
    return _finish(builder, "\n".join([root, *lines]))


def _finish(builder: GrammarBuilder, head: str) -> str:
    grammar = builder.grammar(head)
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise SchemaError(f"the schema makes a grammar of {len(grammar)} characters (limit {MAX_GRAMMAR_CHARS}); "
                          f"simplify it")
    return grammar


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
