"""The errors of the JSON Schema to GBNF path, and how their messages name places and values.

`SchemaError` is a schema that cannot be used (the gateway answers it with a 400);
`Unsatisfiable` is one no value satisfies. `escape_pointer` and `shorten` write the parts of
their messages (and of SchemaCheck's) that come from the client: JSON-pointer segments and texts
cut to a readable length.
"""

from __future__ import annotations


class SchemaError(ValueError):
    """A schema that cannot be used; `path` says where (JSON-pointer style)."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(f"{message} (at {path or '/'})")
        self.path = path


class Unsatisfiable(SchemaError):
    """No JSON value satisfies the (sub)schema."""


def escape_pointer(name: str) -> str:
    """`name` as one segment of a JSON pointer."""
    return name.replace("~", "~0").replace("/", "~1")


def shorten(text: str, limit: int = 300) -> str:
    """`text`, cut to at most `limit` characters."""
    return text if len(text) <= limit else text[:limit - 3] + "..."
