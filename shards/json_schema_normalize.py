"""A client's JSON Schema reduced to what a grammar enforces: the "grammar schema".

`normalize_schema` drops annotations, merges `allOf`, folds the siblings of `anyOf`/`oneOf`/`$ref`
into their branches and exclusive bounds into inclusive integer bounds, and makes every local
`$ref` a named definition (so recursive models work). What a grammar cannot say (`multipleOf`,
`uniqueItems`, `not`, number ranges, a `pattern` that does not translate, ...) is left out, never
refused: the grammar allows a superset there, and SchemaCheck tells after generation. It may also
allow a subset (only declared properties): an answer it allows is still valid. Limits (depth,
size, lengths, item counts) bound what the grammar is asked to do.
The grammar writer (shards/json_schema_gbnf.py) reads its output; see shards/json_schema.py for
how the steps fit together.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any
from urllib.parse import unquote

from shards.json_schema_errors import SchemaError, Unsatisfiable, escape_pointer, shorten
from shards.json_schema_expressions import pattern_grammar

MAX_DEPTH = 16  # nesting of subschemas
MAX_NODES = 2000  # subschemas visited
MAX_STRING_LENGTH = 1000  # minLength/maxLength the grammar enforces; larger ones are checked after
MAX_ITEMS = 64  # minItems/maxItems the grammar enforces; larger ones are checked after

TYPES = ("string", "integer", "number", "boolean", "null", "object", "array")
FORMATS = ("date", "time", "date-time", "uuid", "email")  # enforced by the grammar
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
                          "writeOnly", "$schema", "$id", "$anchor", "$defs", "definitions", "strict",
                          "contentEncoding", "contentMediaType", "discriminator", "nullable"})
_KEYWORDS = {
    "string": ("minLength", "maxLength", "pattern", "format"),
    "integer": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
    "object": ("properties", "required", "additionalProperties", "patternProperties", "propertyNames",
               "minProperties", "maxProperties", "dependentRequired", "dependentSchemas",
               "unevaluatedProperties"),
    "array": ("items", "prefixItems", "additionalItems", "minItems", "maxItems", "uniqueItems", "contains",
              "minContains", "maxContains", "unevaluatedItems"),
}


def normalize_schema(schema: Any, *, require_object: bool = False) -> dict:
    """The grammar schema of `schema` (see the module doc). Raises SchemaError for what cannot be
    used: a reference that is not local or points nowhere, a schema too deep or too large, one
    no value satisfies, or (with `require_object`) one whose values are not objects."""
    if not isinstance(schema, dict):
        raise SchemaError("a schema must be a JSON object")
    norm = _Normalizer(schema)
    out = norm.visit(schema, "", 0)
    if norm.defs:
        out = {**out, "$defs": norm.defs}
    if require_object and _resolve_type(out, norm.defs) != "object":
        raise SchemaError("function parameters must be a schema of type 'object'")
    return out


def _resolve_type(node: dict, defs: dict) -> Any:
    for _ in range(len(defs) + 1):
        ref = node.get("$ref")
        if ref is None:
            return node.get("type")
        node = defs.get(ref.rsplit("/", 1)[-1]) or {}
    return None


class _Normalizer:
    def __init__(self, root: dict) -> None:
        self.root = root
        self.nodes = 0
        self.defs: dict[str, dict] = {}
        self.names: dict[str, str] = {}  # reference -> definition name

    # entry point for every subschema
    def visit(self, schema: Any, path: str, depth: int) -> dict:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise SchemaError(f"the schema is too large (more than {MAX_NODES} subschemas)", path)
        if depth > MAX_DEPTH:
            raise SchemaError(f"the schema is nested too deeply (more than {MAX_DEPTH} levels)", path)
        if schema is True:
            return {}
        if schema is False:
            raise Unsatisfiable("no value satisfies the schema false", path)
        if not isinstance(schema, dict):
            raise SchemaError("a subschema must be an object or a boolean", path)
        schema = {k: v for k, v in schema.items() if k not in _ANNOTATIONS}
        if "allOf" in schema:
            return self.visit(self._merge_all(schema, path), path, depth + 1)
        if "$ref" in schema:
            if len(schema) > 1:  # a reference with constraints beside it: both apply
                ref = {"$ref": schema.pop("$ref")}
                return self.visit({"allOf": [ref, schema]}, path, depth + 1)
            return self._ref(schema["$ref"], path, depth)
        for combiner in ("anyOf", "oneOf"):
            if combiner in schema:
                return self._union(schema, combiner, path, depth)
        if "const" in schema:
            return {"const": _json_value(schema["const"], path)}
        if "enum" in schema:
            return self._enum(schema, path)
        kind = schema.get("type")
        if isinstance(kind, list):
            return self._types(schema, kind, path, depth)
        if kind is None:
            kind = next((t for t in ("object", "array", "string") if any(k in schema for k in _KEYWORDS[t])), None)
            if kind is None:
                if any(k in schema for k in _KEYWORDS["number"]):
                    kind = "number"
                else:
                    return {}
        if kind not in TYPES:
            raise SchemaError(f"unknown type {kind!r}", path)
        return getattr(self, f"_{kind}")(schema, path, depth)

    # -- references and combinations

    def _ref(self, ref: Any, path: str, depth: int) -> dict:
        if ref in self.names:
            return {"$ref": f"#/$defs/{self.names[ref]}"}
        target = self._target(ref, path)
        name = _def_name(ref, set(self.defs))
        self.names[ref] = name
        self.defs[name] = {}  # taken while its body is visited (a recursive reference comes back here)
        self.defs[name] = self.visit(target, f"{path}/$ref", depth + 1)
        return {"$ref": f"#/$defs/{name}"}

    def _target(self, ref: Any, path: str) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"only local references like '#/$defs/Name' are supported; got {_show(ref)}", path)
        node: Any = self.root
        for part in ref[1:].split("/")[1:] if ref not in ("#", "#/") else ():
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise SchemaError(f"$ref {ref!r} points nowhere", path)
        return node

    def _deref(self, schema: Any, path: str) -> Any:
        """A schema with its top-level reference replaced by the target (one level)."""
        seen = set()
        while isinstance(schema, dict) and "$ref" in schema and schema["$ref"] not in seen:
            seen.add(schema["$ref"])
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            target = self._target(schema["$ref"], path)
            if target is False:
                return False
            schema = _merge(target if isinstance(target, dict) else {}, rest)
        return schema

    def _merge_all(self, schema: dict, path: str) -> Any:
        branches = schema["allOf"]
        if not isinstance(branches, list):
            raise SchemaError("allOf must be a list", path)
        out: Any = {k: v for k, v in schema.items() if k != "allOf"}
        for branch in branches:
            branch = self._deref(branch, path)
            if branch is False:
                raise Unsatisfiable("an allOf branch is false", path)
            if isinstance(branch, dict):
                branch = {k: v for k, v in branch.items() if k not in _ANNOTATIONS}
                if "allOf" in branch:
                    branch = self._merge_all(branch, path)
                out = _merge(out, branch)
        return out

    def _union(self, schema: dict, combiner: str, path: str, depth: int) -> dict:
        branches = schema[combiner]
        if not isinstance(branches, list) or not branches:
            raise SchemaError(f"{combiner} must be a non-empty list", path)
        rest = {k: v for k, v in schema.items() if k != combiner}
        out = []
        for i, branch in enumerate(branches):
            merged = {"allOf": [rest, branch]} if rest else branch
            try:
                out.append(self.visit(merged, f"{path}/{combiner}/{i}", depth + 1))
            except Unsatisfiable:
                continue
        if not out:
            raise Unsatisfiable(f"no branch of {combiner} can be satisfied", path)
        # oneOf is generated as anyOf: exact when the branches are disjoint (discriminated unions);
        # otherwise the check after generation tells.
        unique = [b for i, b in enumerate(out) if b not in out[:i]]
        return unique[0] if len(unique) == 1 else {"anyOf": unique}

    def _enum(self, schema: dict, path: str) -> dict:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise SchemaError("enum must be a non-empty list", path)
        kinds = schema.get("type")
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if isinstance(kinds, list):
            values = [v for v in values if _json_type(v) in kinds or (_json_type(v) == "integer" and "number" in kinds)]
            if not values:
                raise Unsatisfiable("no value of enum has the schema's type", path)
        return {"enum": [_json_value(v, path) for v in values]}

    def _types(self, schema: dict, kinds: list, path: str, depth: int) -> dict:
        if not kinds or any(k not in TYPES for k in kinds):
            raise SchemaError(f"type must be one of {', '.join(TYPES)} or a list of them", path)
        if len(kinds) == 1:
            return self.visit({**schema, "type": kinds[0]}, path, depth + 1)
        rest = {k: v for k, v in schema.items() if k != "type"}
        return self._union({"anyOf": [{**rest, "type": t} for t in dict.fromkeys(kinds)]}, "anyOf", path, depth)

    # -- types

    def _string(self, schema: dict, path: str, depth: int) -> dict:
        out: dict = {"type": "string"}
        fmt, pattern = schema.get("format"), schema.get("pattern")
        if fmt in FORMATS:
            return {**out, "format": fmt}
        if isinstance(pattern, str) and pattern_grammar(pattern) is not None:
            return {**out, "pattern": pattern}
        low, high = _count(schema, "minLength"), _count(schema, "maxLength")
        if low is not None and high is not None and low > high:
            raise Unsatisfiable("minLength is greater than maxLength", path)
        if low and low <= MAX_STRING_LENGTH:
            out["minLength"] = low
        if high is not None and high <= MAX_STRING_LENGTH:
            out["maxLength"] = high
        return out

    def _integer(self, schema: dict, path: str, depth: int) -> dict:
        low, high = _bounds(schema)
        low = None if low is None else math.ceil(low)
        high = None if high is None else math.floor(high)
        if low is not None and high is not None and low > high:
            raise Unsatisfiable("no integer lies between the schema's bounds", path)
        out: dict = {"type": "integer"}
        if low is not None:
            out["minimum"] = low
        if high is not None:
            out["maximum"] = high
        return out

    def _number(self, schema: dict, path: str, depth: int) -> dict:
        low, _ = _bounds(schema)
        exclusive = schema.get("exclusiveMinimum")
        if low is not None and low >= 0 or isinstance(exclusive, (int, float)) and not isinstance(exclusive, bool) \
                and exclusive >= 0:
            return {"type": "number", "minimum": 0}  # no sign; the exact bound is checked after
        return {"type": "number"}

    def _boolean(self, schema: dict, path: str, depth: int) -> dict:
        return {"type": "boolean"}

    def _null(self, schema: dict, path: str, depth: int) -> dict:
        return {"type": "null"}

    def _object(self, schema: dict, path: str, depth: int) -> dict:
        props = schema.get("properties") or {}
        required = list(dict.fromkeys(r for r in schema.get("required") or () if isinstance(r, str)))
        extra = schema.get("additionalProperties", True)
        out: dict = {"type": "object"}
        if not props and not required:
            if extra is False:
                return {**out, "properties": {}}
            if isinstance(extra, dict) and extra:
                return {**out, "additionalProperties": self.visit(extra, f"{path}/additionalProperties", depth + 1)}
            return out
        visited: dict[str, dict] = {}
        for name, sub in props.items():
            where = f"{path}/properties/{escape_pointer(name)}"
            try:
                visited[name] = self.visit(sub, where, depth + 1)
            except Unsatisfiable:
                if name in required:
                    raise
        for name in required:
            if name not in visited:  # required but declared nowhere: additionalProperties says what it is
                if extra is False:
                    raise Unsatisfiable(f"{name!r} is required but additionalProperties is false", path)
                visited[name] = self.visit(extra, f"{path}/additionalProperties", depth + 1)
        # Only declared properties are generated: extra keys could repeat a declared name with a
        # value of the wrong type.
        out["properties"] = visited
        if required:
            out["required"] = required
        return out

    def _array(self, schema: dict, path: str, depth: int) -> dict:
        prefix, items = schema.get("prefixItems"), schema.get("items", True)
        if isinstance(items, list):  # draft 2019 and before: items as a list is a tuple
            prefix, items = items, schema.get("additionalItems", True)
        low, high = _count(schema, "minItems") or 0, _count(schema, "maxItems")
        if high is not None and low > high:
            raise Unsatisfiable("minItems is greater than maxItems", path)
        out: dict = {"type": "array"}
        if prefix:
            if high is not None:
                prefix = prefix[:high]
            out["prefixItems"] = [self.visit(p, f"{path}/prefixItems/{i}", depth + 1) for i, p in enumerate(prefix)]
            low, high = max(0, low - len(prefix)), 0 if high is None else high - len(prefix)
            if low > 0 and items is False:
                raise Unsatisfiable("more items are required than prefixItems allows", path)
        if items is False:
            items, high = True, 0
        out["items"] = self.visit(items, f"{path}/items", depth + 1)
        out["minItems"] = min(low, MAX_ITEMS)
        if high is not None and high <= MAX_ITEMS:
            out["maxItems"] = max(high, out["minItems"])
        return out


def _merge(a: Any, b: Any) -> Any:
    """Both schemas at once, as well as a single schema says it; where it cannot (two patterns,
    two different constants) the first wins and the check after generation tells."""
    if not isinstance(a, dict):
        return b if a is True else a
    if not isinstance(b, dict):
        return a if b is True else b
    out = dict(a)
    for key, value in b.items():
        if key not in out or out[key] == value:
            out[key] = value
        elif key == "properties" and isinstance(value, dict) and isinstance(out[key], dict):
            props = dict(out[key])
            for name, sub in value.items():
                props[name] = {"allOf": [props[name], sub]} if name in props else sub
            out[key] = props
        elif key == "required" and isinstance(value, list) and isinstance(out[key], list):
            out[key] = list(dict.fromkeys([*out[key], *value]))
        elif key == "type":
            left = out[key] if isinstance(out[key], list) else [out[key]]
            right = value if isinstance(value, list) else [value]
            both = [t for t in left if t in right or (t == "integer" and "number" in right)]
            both += [t for t in right if t == "integer" and "number" in left and t not in both]
            out[key] = both if len(both) != 1 else both[0]
        elif key in ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties") \
                and _is_number(value) and _is_number(out[key]):
            out[key] = max(out[key], value)
        elif key in ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties") \
                and _is_number(value) and _is_number(out[key]):
            out[key] = min(out[key], value)
        elif key in ("anyOf", "oneOf") and isinstance(out[key], list):
            # (A1 | A2) and B: each branch of the first with B (one anyOf fewer each time round)
            out[key] = [{"allOf": [branch, {key: value}]} for branch in out[key]]
        elif key in ("additionalProperties", "items"):
            out[key] = {"allOf": [out[key], value]}
    return out


def _bounds(schema: dict) -> tuple[float | None, float | None]:
    """(lowest, highest) a number may be, inclusive; exclusive bounds move by one for integers only
    after the caller rounds (ceil/floor), so they move here by the smallest step that keeps them
    exclusive for integers."""
    low, high = schema.get("minimum"), schema.get("maximum")
    low = low if _is_number(low) else None
    high = high if _is_number(high) else None
    ex_low, ex_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if ex_low is True and low is not None:  # draft 4: a flag on minimum
        low = math.floor(low) + 1
    elif _is_number(ex_low):
        low = max(low, math.floor(ex_low) + 1) if low is not None else math.floor(ex_low) + 1
    if ex_high is True and high is not None:
        high = math.ceil(high) - 1
    elif _is_number(ex_high):
        high = min(high, math.ceil(ex_high) - 1) if high is not None else math.ceil(ex_high) - 1
    return low, high


def _count(schema: dict, key: str) -> int | None:
    value = schema.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), "unknown")


def _json_value(value: Any, path: str) -> Any:
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        raise SchemaError("constants must be finite JSON values", path) from None
    return value


def _def_name(ref: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", unquote(ref.rstrip("/").rsplit("/", 1)[-1])).strip("-.") or "root"
    if ref in ("#", "#/"):
        base = "root"
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}-{i}"
    return name


def _show(value: Any) -> str:
    return shorten(json.dumps(value), 60)
