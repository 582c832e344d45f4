"""The gateway's side of tool calling and JSON answers.

Request fields (`tools`, `tool_choice`, `parallel_tool_calls`, `response_format`, tool messages
and assistant `tool_calls`) are checked here into a ToolUse: the grammar the replica decodes with
(shards/tools.py builds it) and the preamble that shows the model the functions. On the way back,
ToolShaper turns the model's text into OpenAI's `tool_calls`, in whole messages or stream deltas.

Schemas. A schema that is not JSON Schema (its draft's metaschema says so), or that no value can
satisfy, or that is over the size limits, is a 400 naming the parameter. Any other schema is
accepted: the grammar enforces what a grammar can (types, required properties, enums and
constants, integer ranges, string lengths, formats date/time/date-time/uuid/email, patterns that
translate, item counts, unions, references including recursive ones), and the answer is then
validated against the schema as sent (`jsonschema`, formats included) for the rest (`multipleOf`,
number ranges, `uniqueItems`, `not`, patterns that do not translate, ...).

A violation is reported, never hidden: the choice's message gets a `refusal` string that says what
is wrong and where (a JSON pointer), e.g. "The arguments of get_weather do not match its
parameters schema: 40 is greater than the maximum of 31 (at /day)"; the text or the tool calls
stay as generated and `finish_reason` keeps its usual value. In a stream, the refusal comes as a
`{"refusal": ...}` delta just before the chunk with the finish_reason. The openai SDK's
`chat.completions.parse` then leaves `parsed` as None instead of raising.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from mesh.core.errors import bad_request
from shards.tools import (
    NAME_RE,
    ArgsOut,
    CallParser,
    CallStart,
    SchemaCheck,
    SchemaError,
    TextOut,
    Tool,
    call_text,
    check_schema,
    json_grammar,
    json_preamble,
    normalize_schema,
    tool_grammar,
    tool_result_text,
    tools_preamble,
)
from shards.types import Message

MAX_TOOLS = 128
MAX_SCHEMA_BYTES = 32 * 1024  # one function's parameters, or a response_format schema, as JSON
MAX_DESCRIPTION_CHARS = 4096
_ALNUM = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolUse:
    """What a chat request asks beyond text: tools the model may call, or a JSON answer."""
    tools: tuple[Tool, ...] = ()
    choice: str = "none"  # none | auto | required | the name of the one function to call
    parallel: bool = False
    format: str = "text"  # text | json_object | json_schema
    schema: Any = None  # response_format's schema as sent (shown to the model)
    grammar: str | None = None
    preamble: str | None = None  # a system message telling the model about the tools or the JSON
    checks: tuple[tuple[str, Any], ...] = ()  # (function name, SchemaCheck of its parameters)
    content_check: Any = None  # SchemaCheck of response_format's schema

    @property
    def calls(self) -> bool:
        """The output is parsed for tool calls."""
        return bool(self.tools) and self.choice != "none"


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


# -- requests -------------------------------------------------------------------------------------

def parse_tool_use(body: dict) -> ToolUse | None:
    """The request's tool and response-format fields, or None when it asks for plain text."""
    for legacy in ("functions", "function_call"):
        if body.get(legacy) is not None:
            raise bad_request(f"'{legacy}' is deprecated and not supported; use 'tools' and 'tool_choice'.", legacy)
    tools = _tools(body.get("tools"))
    choice = _choice(body.get("tool_choice"), tools)
    # Several calls in one answer only when asked for: OpenAI's default is true, but a small model
    # that may write a second call tends to repeat the first until the limit.
    parallel = body.get("parallel_tool_calls")
    if parallel is None:
        parallel = False
    if not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be a boolean.", "parallel_tool_calls")
    fmt, schema, normalized, content_check = _response_format(body.get("response_format"))
    if choice == "none":
        tools = ()  # the model is not told about tools it may not call
    if not tools and fmt == "text":
        return None
    try:
        if tools:
            grammar = tool_grammar(tools, choice, parallel=parallel, content_schema=normalized,
                                   json_content=fmt != "text")
            preamble = tools_preamble(tools, choice, parallel=parallel)
            if fmt != "text" and choice == "auto":
                preamble += "\n\n" + json_preamble(schema)
        else:
            grammar, preamble = json_grammar(normalized), json_preamble(schema)
    except SchemaError as exc:
        raise bad_request(str(exc), "tools" if tools else "response_format") from None
    checks = tuple((t.name, check) for t in tools if (check := _checker(t.parameters)) is not None)
    return ToolUse(tools=tools, choice=choice, parallel=parallel, format=fmt, schema=schema, grammar=grammar,
                   preamble=preamble, checks=checks, content_check=content_check)


def _tools(raw: Any) -> tuple[Tool, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise bad_request("'tools' must be a non-empty array of tools.", "tools")
    if len(raw) > MAX_TOOLS:
        raise bad_request(f"At most {MAX_TOOLS} tools per request; got {len(raw)}.", "tools")
    out, seen = [], set()
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad_request(f"{where} must be an object with \"type\": \"function\".", f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise bad_request(f"{where}.function must be an object.", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise bad_request(f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-'; "
                              f"got {_show(name)}.", f"{where}.function.name")
        if name in seen:
            raise bad_request(f"{where}.function.name: the name {name!r} is used by another tool.",
                              f"{where}.function.name")
        seen.add(name)
        description = fn.get("description", "")
        if description is None:
            description = ""
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
            raise bad_request(f"{where}.function.description must be a string of at most "
                              f"{MAX_DESCRIPTION_CHARS} characters.", f"{where}.function.description")
        if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
            raise bad_request(f"{where}.function.strict must be a boolean.", f"{where}.function.strict")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        param = f"{where}.function.parameters"
        normalized = _schema(params, param, require_object=True)
        out.append(Tool(name=name, description=description, parameters=params, normalized=normalized))
    return tuple(out)


def _schema(schema: Any, param: str, require_object: bool = False) -> dict:
    if not isinstance(schema, dict):
        raise bad_request(f"'{param}' must be a JSON schema object.", param)
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_BYTES:
        raise bad_request(f"'{param}' is {size} bytes of JSON; the limit is {MAX_SCHEMA_BYTES}.", param)
    try:
        check_schema(schema)
    except SchemaError as exc:
        raise bad_request(f"'{param}' is {exc}", param) from None
    except ImportError:  # no jsonschema on this node: what the grammar builder refuses is still refused
        pass
    except RecursionError:
        raise bad_request(f"'{param}' is nested too deeply.", param) from None
    try:
        return normalize_schema(schema, require_object=require_object)
    except SchemaError as exc:
        raise bad_request(f"'{param}' cannot be used: {exc}", param) from None
    except RecursionError:
        raise bad_request(f"'{param}' is nested too deeply.", param) from None


def _checker(schema: Any) -> SchemaCheck | None:
    """The check after generation for `schema`; None without jsonschema (the grammar alone then)."""
    try:
        return SchemaCheck(schema)
    except ImportError:
        return None


def _choice(raw: Any, tools: tuple[Tool, ...]) -> str:
    if raw is None:
        return "auto" if tools else "none"
    if raw in ("none", "auto"):
        return raw
    if raw == "required":
        if not tools:
            raise bad_request("'tool_choice' is 'required' but no 'tools' were given.", "tool_choice")
        return raw
    if isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("function"), dict):
        name = raw["function"].get("name")
        if not tools:
            raise bad_request("'tool_choice' names a function but no 'tools' were given.", "tool_choice")
        if not isinstance(name, str) or name not in {t.name for t in tools}:
            raise bad_request(f"'tool_choice' names the function {_show(name)}, which is not among 'tools'.",
                              "tool_choice")
        return name
    raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or "
                      "{\"type\": \"function\", \"function\": {\"name\": ...}}.", "tool_choice")


def _response_format(raw: Any) -> tuple[str, Any, dict | None, SchemaCheck | None]:
    """(type, schema as sent, normalized schema, its check after generation)."""
    if raw is None:
        return "text", None, None, None
    if not isinstance(raw, dict) or raw.get("type") not in ("text", "json_object", "json_schema"):
        raise bad_request("'response_format.type' must be 'text', 'json_object' or 'json_schema'.",
                          "response_format")
    kind = raw["type"]
    if kind != "json_schema":
        return kind, None, None, None
    spec = raw.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request("'response_format.json_schema' must be an object with 'name' and 'schema'.",
                          "response_format.json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise bad_request("'response_format.json_schema.name' must be 1 to 64 letters, digits, '_' or '-'.",
                          "response_format.json_schema.name")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise bad_request("'response_format.json_schema.strict' must be a boolean.",
                          "response_format.json_schema.strict")
    schema = spec.get("schema")
    param = "response_format.json_schema.schema"
    if schema is None:
        raise bad_request(f"'{param}' is required.", param)
    return kind, schema, _schema(schema, param), _checker(schema)


def content_violation(use: ToolUse | None, text: str) -> str | None:
    """What is wrong with a JSON answer to a response_format json_schema request (the refusal
    text, see the module doc), or None when it is valid or there is no schema to check."""
    if use is None or use.content_check is None:
        return None
    problem = use.content_check.text_violation(text)
    return None if problem is None else f"The answer does not match the response_format schema: {problem}"


# -- messages -------------------------------------------------------------------------------------

def lower_message(m: dict, where: str, content: Any, calls_by_id: dict[str, str]) -> Message | None:
    """An assistant message with tool_calls, or a tool result, as the plain message the model
    sees (calls in the format it writes them). None for an ordinary message."""
    role = m.get("role")
    if role == "tool":
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise bad_request(f"{where}.tool_call_id is required for a tool message.", f"{where}.tool_call_id")
        if content is None:
            raise bad_request(f"{where}.content is required for a tool message.", f"{where}.content")
        return Message("user", tool_result_text(calls_by_id.get(call_id), content))
    calls = m.get("tool_calls")
    if role != "assistant" or calls is None:
        return None
    if not isinstance(calls, list) or not calls:
        raise bad_request(f"{where}.tool_calls must be a non-empty array.", f"{where}.tool_calls")
    lines = [content] if content else []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or call.get("type", "function") != "function" or not isinstance(fn, dict):
            raise bad_request(f"{at} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                              f"\"arguments\"}}}}.", at)
        if not isinstance(call.get("id"), str) or not call["id"]:
            raise bad_request(f"{at}.id must be a non-empty string.", f"{at}.id")
        name, arguments = fn.get("name"), fn.get("arguments")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise bad_request(f"{at}.function.name must be 1 to 64 letters, digits, '_' or '-'.", f"{at}.function.name")
        if not isinstance(arguments, str):
            raise bad_request(f"{at}.function.arguments must be a string (JSON).", f"{at}.function.arguments")
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError):
            raise bad_request(f"{at}.function.arguments is not valid JSON.", f"{at}.function.arguments") from None
        calls_by_id[call["id"]] = name
        lines.append(call_text(name, json.dumps(parsed, ensure_ascii=False)))
    return Message("assistant", "\n".join(lines))


# -- answers --------------------------------------------------------------------------------------

@dataclass
class ToolShaper:
    """One choice's output read as tool calls: stream deltas as it comes, or the whole message."""
    use: ToolUse
    parser: CallParser = field(init=False)
    ids: list[str] = field(default_factory=list)
    violation: str | None = None  # set by finish(): what is wrong with the answer, see the module doc

    def __post_init__(self) -> None:
        self.parser = CallParser(tuple(t.name for t in self.use.tools),
                                 allow_text=self.use.choice == "auto")

    def feed(self, text: str) -> list[dict]:
        """Stream deltas for a piece of the model's text (none while a call's header is held)."""
        return self._deltas(self.parser.feed(text))

    def finish(self) -> list[dict]:
        """The last deltas: text held back, then a refusal if the answer breaks its schema."""
        deltas = self._deltas(self.parser.finish())
        self.violation = self._violation()
        return deltas + ([{"refusal": self.violation}] if self.violation else [])

    def _violation(self) -> str | None:
        if not self.parser.calls:
            return content_violation(self.use, self.parser.text) if self.parser.text.strip() else None
        if not self.parser.complete:
            return None  # cut short (finish_reason says so): nothing whole to check
        checks = dict(self.use.checks)
        for name, arguments in self.parser.calls:
            check = checks.get(name)
            problem = check.text_violation(arguments) if check is not None else None
            if problem is not None:
                return f"The arguments of {name} do not match its parameters schema: {problem}"
        return None

    def finish_reason(self, reason: str) -> str:
        """'tool_calls' when the output is whole calls and ended as the grammar allowed it."""
        if self.parser.calls and reason == "stop" and self.parser.complete:
            return "tool_calls"
        return reason

    def _deltas(self, events: list) -> list[dict]:
        out = []
        for e in events:
            if isinstance(e, TextOut):
                out.append({"content": e.text})
            elif isinstance(e, CallStart):
                self.ids.append(new_call_id())
                out.append({"tool_calls": [{"index": e.index, "id": self.ids[e.index], "type": "function",
                                            "function": {"name": e.name, "arguments": ""}}]})
            elif isinstance(e, ArgsOut):
                out.append({"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]})
        return out

    def message(self) -> dict:
        """The whole answer as a chat.completion message."""
        if not self.parser.calls:
            return {"role": "assistant", "content": self.parser.text, "refusal": self.violation}
        calls = [{"id": self.ids[i] if i < len(self.ids) else new_call_id(), "type": "function",
                  "function": {"name": name, "arguments": args}}
                 for i, (name, args) in enumerate(self.parser.calls)]
        return {"role": "assistant", "content": None, "refusal": self.violation, "tool_calls": calls}


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."

