"""The GBNF writer: llama.cpp grammar rules for the values of a grammar schema.

`GrammarBuilder` turns normalize_schema's output into rules, in the spirit of llama.cpp's
json-schema-to-grammar converter: objects with their declared properties in order, arrays with
bounded item counts, strings with bounded lengths, the date/time/uuid/email formats, integer
ranges and patterns (through shards/json_schema_expressions.py), JSON strings that exclude raw
control characters. `compile_grammar` writes a whole grammar around a head of the caller's.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from shards.json_schema_errors import SchemaError
from shards.json_schema_expressions import CHAR_RULE, gbnf_literal, integer_range, pattern_grammar

INT_DIGITS = 16  # digits of an integer the grammar writes when the schema sets no bound

_PRIMITIVES = {
    "space": '" "?',
    "char": CHAR_RULE,
    "string": '"\\"" char* "\\"" space',
    "integral-part": "[0-9] | [1-9] [0-9]{1,15}",
    "decimal-part": "[0-9]{1,16}",
    "integer": '("-"? integral-part) space',
    "number": '("-"? integral-part) ("." decimal-part)? ([eE] [-+]? integral-part)? space',
    "unsigned-number": 'integral-part ("." decimal-part)? ([eE] [-+]? integral-part)? space',
    "boolean": '("true" | "false") space',
    "null": '"null" space',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" space ( string ":" space value ("," space string ":" space value)* )? "}" space',
    "array": '"[" space ( value ("," space value)* )? "]" space',
    "date": '[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )',
    "time": '([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{1,6} )? '
            '( "Z" | ( "+" | "-" ) ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )',
    "date-time": 'date "T" time',
    "uuid": '[0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{12}',
    "email": '[a-zA-Z0-9._%+-]+ "@" [a-zA-Z0-9-]+ ("." [a-zA-Z0-9-]+)+',
}
_DEPENDS = {"string": ("char", "space"), "integer": ("integral-part", "space"),
            "number": ("integral-part", "decimal-part", "space"),
            "unsigned-number": ("integral-part", "decimal-part", "space"),
            "boolean": ("space",), "null": ("space",),
            "value": ("object", "array", "string", "number", "boolean", "null"),
            "object": ("string", "value", "space"), "array": ("value", "space"), "date-time": ("date", "time")}


class GrammarBuilder:
    """Rules for grammar schemas (normalize_schema's output); `grammar(head)` writes them out."""

    def __init__(self) -> None:
        self.rules: dict[str, str] = {}
        self._scopes: list[tuple[str, dict]] = []  # (rule-name prefix, $defs) of the schemas being visited
        self._defs: dict[tuple[int, str], str] = {}  # (scope id, definition) -> rule name

    def grammar(self, head: str) -> str:
        return head + "\n" + "\n".join(f"{name} ::= {body}" for name, body in sorted(self.rules.items())) + "\n"

    def primitive(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = _PRIMITIVES[name]
            for dep in _DEPENDS.get(name, ()):
                self.primitive(dep)
        return name

    def add(self, name: str, body: str) -> str:
        """A rule named after `name` (made unique) with `body`; an identical rule is reused."""
        name = re.sub(r"[^a-zA-Z0-9-]+", "-", name).strip("-") or "r"
        if name in _PRIMITIVES:
            name += "-"
        key, i = name, 0
        while key in self.rules and self.rules[key] != body:
            i += 1
            key = f"{name}{i}"
        self.rules[key] = body
        return key

    def visit(self, schema: dict, name: str) -> str:
        """The name of a rule for the values of `schema`."""
        defs = schema.get("$defs")
        if defs:
            self._scopes.append((name, defs))
            try:
                return self.add(name, self._body(schema, name))
            finally:
                self._scopes.pop()
        return self.add(name, self._body(schema, name))

    def _body(self, s: dict, name: str) -> str:
        if "$ref" in s:
            return self._ref(s["$ref"])
        if "anyOf" in s:
            return " | ".join(self.visit(b, f"{name}-{i}") for i, b in enumerate(s["anyOf"]))
        if "const" in s:
            return self._constant(s["const"])
        if "enum" in s:
            return " | ".join(self._constant(v) for v in s["enum"])
        kind = s.get("type")
        if kind is None:
            return self.primitive("value")
        return getattr(self, f"_{kind}")(s, name)

    def _constant(self, value: Any) -> str:
        return gbnf_literal(json.dumps(value, ensure_ascii=False)) + " " + self.primitive("space")

    def _ref(self, ref: str) -> str:
        target = ref.rsplit("/", 1)[-1]
        for depth in range(len(self._scopes) - 1, -1, -1):
            prefix, defs = self._scopes[depth]
            if target in defs:
                key = (id(defs), target)
                if key not in self._defs:
                    # claimed before its body (recursion comes back here), with a body no other rule has
                    rule = self.add(f"{prefix}-{target}", f"<pending {len(self.rules)}>")
                    self._defs[key] = rule
                    saved, self._scopes = self._scopes, self._scopes[:depth + 1]
                    try:
                        self.rules[rule] = self._body(defs[target], rule)
                    finally:
                        self._scopes = saved
                return self._defs[key]
        raise SchemaError(f"$ref {ref!r} points nowhere")

    def _string(self, s: dict, name: str) -> str:
        if "format" in s:
            inner = self.primitive(s["format"])
        elif "pattern" in s:
            inner = pattern_grammar(s["pattern"])
            if inner is None:
                raise SchemaError(f"pattern {s['pattern']!r} does not translate to a grammar")
            self.primitive("char")
        elif "minLength" in s or "maxLength" in s:
            low, high = s.get("minLength", 0), s.get("maxLength")
            inner = f"{self.primitive('char')}{{{low},{'' if high is None else high}}}"
        else:
            return self.primitive("string")
        return f'"\\"" {inner} "\\"" {self.primitive("space")}'

    def _integer(self, s: dict, name: str) -> str:
        if "minimum" not in s and "maximum" not in s:
            return self.primitive("integer")
        top = 10 ** INT_DIGITS - 1  # a side with no bound: at most INT_DIGITS digits
        low, high = s.get("minimum"), s.get("maximum")
        low = min(-top, high) if low is None else low
        high = max(top, low) if high is None else high
        return f"({integer_range(low, high)}) {self.primitive('space')}"

    def _number(self, s: dict, name: str) -> str:
        return self.primitive("unsigned-number" if s.get("minimum") == 0 else "number")

    def _boolean(self, s: dict, name: str) -> str:
        return self.primitive("boolean")

    def _null(self, s: dict, name: str) -> str:
        return self.primitive("null")

    def _object(self, s: dict, name: str) -> str:
        space = self.primitive("space")
        if "properties" not in s:
            if "additionalProperties" not in s:
                return self.primitive("object")
            value = self.visit(s["additionalProperties"], f"{name}-value")
            kv = f'{self.primitive("string")} ":" {space} {value}'
            return f'"{{" {space} ( {kv} ("," {space} {kv})* )? "}}" {space}'
        props, required = s["properties"], set(s.get("required", ()))
        kvs = [(self.add(f"{name}-{p}-kv", f'{gbnf_literal(json.dumps(p, ensure_ascii=False))} {space} ":" {space} '
                                          f'{self.visit(sub, f"{name}-{p}")}'), p in required)
               for p, sub in props.items()]
        return " ".join(x for x in ('"{"', space, self._properties(kvs, name), '"}"', space) if x)

    def _properties(self, kvs: list[tuple[str, bool]], name: str) -> str:
        """Properties in their declared order, each optional one free to be left out: the first
        one written is any up to the first required one; after a written one, each next one is
        `"," kv`, optional or not. Linear in the properties: one rule per position after it."""
        space = self.primitive("space")
        after: list[str] = [""] * (len(kvs) + 1)  # after[i]: what may follow once kvs[:i] are done
        for i in range(len(kvs) - 1, -1, -1):
            kv, must = kvs[i]
            step = f'"," {space} {kv}' if must else f'( "," {space} {kv} )?'
            body = f"{step} {after[i + 1]}".strip()
            after[i] = self.add(f"{name}-after-{i}", body) if i > 0 and after[i + 1] else body
        firsts = []
        for i, (kv, must) in enumerate(kvs):
            firsts.append(f"{kv} {after[i + 1]}".strip())
            if must:
                break
        if not kvs:
            return ""
        choice, some_required = " | ".join(firsts), kvs[len(firsts) - 1][1]
        if len(firsts) > 1 or not some_required:
            choice = f"( {choice} )"
        return choice if some_required else f"{choice}?"

    def _array(self, s: dict, name: str) -> str:
        space = self.primitive("space")
        comma = f'"," {space}'
        item = self.visit(s.get("items", {}), f"{name}-item")
        low, high = s.get("minItems", 0), s.get("maxItems")
        prefix = [self.visit(p, f"{name}-{i}") for i, p in enumerate(s.get("prefixItems", ()))]
        if prefix:
            head = f" {comma} ".join(prefix)
            if high == 0:
                return f'"[" {space} {head} "]" {space}'
            more = _repeat(f"{comma} {item}", low, high)
            return f'"[" {space} {head} {more} "]" {space}'
        if high == 0:
            return f'"[" {space} "]" {space}'
        run = f"{item} {_repeat(f'{comma} {item}', max(low - 1, 0), None if high is None else high - 1)}".strip()
        return f'"[" {space} {run if low else f"( {run} )?"} "]" {space}'


def _repeat(expr: str, low: int, high: int | None) -> str:
    if high is not None and high == 0:
        return ""
    if (low, high) == (0, None):
        return f"({expr})*"
    if (low, high) == (0, 1):
        return f"({expr})?"
    return f"({expr}){{{low},{'' if high is None else high}}}"


def compile_grammar(head: Callable[[GrammarBuilder], str]) -> str:
    """A whole grammar: `head` adds its rules through the builder and returns the root lines."""
    builder = GrammarBuilder()
    return builder.grammar(head(builder))
