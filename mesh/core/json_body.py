"""A request body as a JSON object, or a 400 in the API's shape that says what is wrong with it."""

from __future__ import annotations

import json
from typing import Any

from mesh.core.errors import bad_request


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise bad_request("We could not parse the JSON body of your request. The body must be a JSON "
                          "object (see https://platform.openai.com/docs/api-reference).") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    if _lone_surrogates(raw, body):
        raise bad_request("The JSON body holds a lone UTF-16 surrogate (\\ud800-\\udfff, escaped or encoded); "
                          "strings must be valid Unicode.")
    return body


def _lone_surrogates(raw: bytes, body: dict) -> bool:
    """json.loads takes '\\ud800' alone (and decodes bytes with 'surrogatepass'); such a str cannot be
    encoded as UTF-8 later, in a tokenizer or in the error message that echoes it."""
    if raw.isascii() and b"\\u" not in raw:
        return False
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
