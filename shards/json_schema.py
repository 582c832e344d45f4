"""JSON Schema -> a GBNF grammar for llama.cpp, and the check of an answer after generation.

Three steps, each with one job:

1. `check_schema`: is it JSON Schema at all (the metaschema of its `$schema` draft, 2020-12 by
   default, through the `jsonschema` package)? Only a schema that is not is refused.
2. `normalize_schema`: the schema reduced to what a grammar enforces (the "grammar schema"):
   annotations dropped, `allOf` merged, siblings of `anyOf`/`oneOf`/`$ref` folded into their
   branches, exclusive bounds folded into inclusive integer bounds, every local `$ref` made a
   named definition (so recursive models work). What a grammar cannot say (`multipleOf`,
   `uniqueItems`, `not`, number ranges, a `pattern` that does not translate, ...) is left out of
   it, never refused: the grammar then allows a superset in those places only, and step 3 tells.
   The grammar may also allow a *subset* of the schema (objects get only their declared
   properties, numbers at most 16 digits): an answer it allows is still valid there.
3. `SchemaCheck`: the answer validated against the schema as the client sent it, after generation.

`GrammarBuilder` writes the grammar from a grammar schema, in the spirit of llama.cpp's
json-schema-to-grammar converter (integer ranges as digit-by-digit rules like its
`_build_min_max_int`, string lengths as bounded repetitions, the date/time/uuid formats, regular
expressions translated to rules), with JSON strings that exclude raw control characters.

This module is the public entry point; the parts live beside it, each importing only those
above it in this list:

- shards/json_schema_errors.py: SchemaError, Unsatisfiable, and how messages name places;
- shards/json_schema_expressions.py: GBNF literals, integer ranges and regular expressions;
- shards/json_schema_validate.py: steps 1 and 3 (the `jsonschema` package);
- shards/json_schema_normalize.py: step 2 and its limits;
- shards/json_schema_gbnf.py: the grammar writer.
"""

from __future__ import annotations

from shards.json_schema_errors import SchemaError, Unsatisfiable
from shards.json_schema_expressions import CHAR_RULE, MAX_REPEAT, gbnf_literal, integer_range, pattern_grammar
from shards.json_schema_gbnf import INT_DIGITS, GrammarBuilder, compile_grammar
from shards.json_schema_normalize import (
    FORMATS,
    MAX_DEPTH,
    MAX_ITEMS,
    MAX_NODES,
    MAX_STRING_LENGTH,
    TYPES,
    normalize_schema,
)
from shards.json_schema_validate import SchemaCheck, check_schema

__all__ = [
    "CHAR_RULE", "FORMATS", "INT_DIGITS", "MAX_DEPTH", "MAX_ITEMS", "MAX_NODES", "MAX_REPEAT",
    "MAX_STRING_LENGTH", "TYPES", "GrammarBuilder", "SchemaCheck", "SchemaError", "Unsatisfiable",
    "check_schema", "compile_grammar", "gbnf_literal", "integer_range", "normalize_schema",
    "pattern_grammar",
]
