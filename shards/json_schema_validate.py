"""JSON Schema validation through the `jsonschema` package, before and after generation.

Before: `check_schema`, is a client's schema JSON Schema at all (the metaschema of its `$schema`
draft, 2020-12 by default)? Only a schema that is not is refused. After: `SchemaCheck`, is an
answer valid under the schema as the client sent it, formats included? That tells what the
grammar could not enforce (see shards/json_schema.py).
"""

from __future__ import annotations

import json
from typing import Any

from shards.json_schema_errors import SchemaError, escape_pointer, shorten


def check_schema(schema: Any) -> None:
    """Raises SchemaError unless `schema` is valid under its draft's metaschema (2020-12 unless
    `$schema` names another)."""
    if not isinstance(schema, dict):
        raise SchemaError("a schema must be a JSON object")
    from jsonschema import Draft202012Validator, exceptions, validators

    cls = validators.validator_for(schema, default=Draft202012Validator)
    error = exceptions.best_match(cls(cls.META_SCHEMA).iter_errors(schema))
    if error is not None:
        where = _where(error) if error.absolute_path else ""
        raise SchemaError(f"not a valid JSON Schema: {shorten(error.message)}", where)


class SchemaCheck:
    """Validates values against one schema as the client sent it (formats included)."""

    def __init__(self, schema: dict) -> None:
        from jsonschema import Draft202012Validator, FormatChecker, validators

        cls = validators.validator_for(schema, default=Draft202012Validator)
        self._validator = cls(schema, format_checker=FormatChecker())

    def violation(self, value: Any) -> str | None:
        """None when `value` is valid, else what is wrong and where (a JSON pointer)."""
        from jsonschema import exceptions

        try:
            error = exceptions.best_match(self._validator.iter_errors(value))
        except Exception as exc:  # noqa: BLE001 - a schema jsonschema cannot apply (e.g. a bad regex)
            return f"the schema could not be applied: {shorten(str(exc))}"
        if error is None:
            return None
        return f"{shorten(error.message)} (at {_where(error)})"

    def text_violation(self, text: str) -> str | None:
        """As `violation`, for a value still in its JSON text."""
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return "the answer is not valid JSON"
        return self.violation(value)


def _where(error: Any) -> str:
    """The JSON pointer of the value a jsonschema error is about."""
    return "/" + "/".join(escape_pointer(str(p)) for p in error.absolute_path)
