"""GBNF expressions for the two keywords that are small languages of their own.

`integer_range` writes the integers minimum..maximum digit by digit, as llama.cpp's
`_build_min_max_int` does; `pattern_grammar` translates an ECMA regular expression (`pattern`)
to rules over the characters of a JSON string. Both write with `gbnf_literal` and `CHAR_RULE`
(a JSON string's characters, none of the raw control characters), which the grammar writer
(shards/json_schema_gbnf.py) uses as well. Nothing here knows about schemas.
"""

from __future__ import annotations

import json
import re

MAX_REPEAT = 200  # {m,n} of a regular expression the grammar enforces
# A JSON string's characters: none of the raw control characters json.loads refuses; escapes as in JSON.
CHAR_RULE = r'[^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
_PLAIN = r'[^"\\\x7F\x00-\x1F]'  # one character written as itself in a JSON string


def gbnf_literal(text: str) -> str:
    """`text` as a GBNF string literal."""
    out = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r") \
        .replace("\t", "\\t")
    return f'"{out}"'


# -- integer ranges -------------------------------------------------------------------------------

def integer_range(low: int, high: int) -> str:
    """A GBNF expression for the integers low..high written as JSON writes them (no leading
    zeros, no "-0"), digit by digit, linear in the number of digits."""
    parts = []
    if low < 0:
        neg_low, neg_high = max(1, -high), -low  # magnitudes of the negative part
        if neg_low <= neg_high:
            parts.append(f'"-" ({_unsigned_range(neg_low, neg_high)})')
    if high >= 0:
        parts.append(_unsigned_range(max(low, 0), high))
    return " | ".join(parts)


def _unsigned_range(low: int, high: int) -> str:
    alternatives, whole = [], []  # whole: lengths (over 1 digit) all of whose numbers are in range
    for digits in range(len(str(low)), len(str(high)) + 1):
        a = max(low, 10 ** (digits - 1) if digits > 1 else 0)
        b = min(high, 10 ** digits - 1)
        if digits > 1 and (a, b) == (10 ** (digits - 1), 10 ** digits - 1):
            whole.append(digits - 1)
        elif a <= b:
            alternatives.append(_same_length(str(a), str(b)))
    if whole:  # consecutive lengths, as one repetition
        span = f"{whole[0]}" if len(whole) == 1 else f"{whole[0]},{whole[-1]}"
        alternatives.insert(1 if len(str(low)) < whole[0] + 1 else 0, f"[1-9] [0-9]{{{span}}}")
    return " | ".join(alternatives)


def _same_length(a: str, b: str) -> str:
    """Numbers from a to b, both of len(a) digits."""
    if a == b:
        return gbnf_literal(a)
    if len(a) == 1:
        return f"[{a}-{b}]"
    rest = len(a) - 1
    if a[1:] == "0" * rest and b[1:] == "9" * rest:
        return f"[{a[0]}-{b[0]}] [0-9]{{{rest}}}"
    if a[0] == b[0]:
        return f'"{a[0]}" ({_same_length(a[1:], b[1:])})'
    out = [f'"{a[0]}" ({_same_length(a[1:], "9" * rest)})']
    if int(b[0]) - int(a[0]) > 1:
        middle = f"{int(a[0]) + 1}" if int(b[0]) - int(a[0]) == 2 else f"[{int(a[0]) + 1}-{int(b[0]) - 1}]"
        out.append(f"{gbnf_literal(middle) if len(middle) == 1 else middle} [0-9]{{{rest}}}")
    out.append(f'"{b[0]}" ({_same_length("0" * rest, b[1:])})')
    return " | ".join(out)


# -- regular expressions --------------------------------------------------------------------------

class _Untranslatable(Exception):
    pass


def pattern_grammar(pattern: str) -> str | None:
    """A GBNF expression for the characters inside a JSON string whose value matches the ECMA
    regular expression `pattern` (searched, as JSON Schema reads `pattern`: unanchored ends match
    anything), or None when the pattern uses what no grammar here expresses (lookarounds,
    backreferences, word boundaries, flags). The expression may allow fewer strings than the
    pattern (characters that would need escaping inside a JSON string are left out of classes),
    never more."""
    try:
        return _RegexTranslator(pattern).translate()
    except (_Untranslatable, IndexError, ValueError):
        return None


class _RegexTranslator:
    _SPECIAL = set("\\^$.|?*+()[]{}")

    def __init__(self, pattern: str) -> None:
        self.p = pattern
        self.i = 0

    def translate(self) -> str:
        p = self.p
        start = p.startswith("^")
        end = p.endswith("$") and not p.endswith("\\$") or p.endswith("\\\\$")
        self.i = 1 if start else 0
        self.stop = len(p) - 1 if end else len(p)
        if self.i > self.stop:
            raise _Untranslatable
        branches = self._alternatives()
        if self.i != self.stop:
            raise _Untranslatable
        if len(branches) > 1 and (start or end):
            raise _Untranslatable  # ^a|b$ anchors each branch differently
        body = " | ".join(b or '""' for b in branches) if branches else '""'
        body = f"({body})" if len(branches) > 1 else body
        any_text = "(" + CHAR_RULE + ")*"
        return " ".join(x for x in (None if start else any_text, body, None if end else any_text) if x)

    def _alternatives(self) -> list[str]:
        branches = [self._sequence()]
        while self.i < self.stop and self.p[self.i] == "|":
            self.i += 1
            branches.append(self._sequence())
        return branches

    def _sequence(self) -> str:
        parts: list[str] = []
        while self.i < self.stop and self.p[self.i] not in "|)":
            atom = self._atom()
            parts.append(self._quantified(atom))
        return " ".join(parts)

    def _atom(self) -> str:
        p, c = self.p, self.p[self.i]
        if c == "(":
            self.i += 1
            if p.startswith("?:", self.i):
                self.i += 2
            elif p.startswith("?", self.i):
                raise _Untranslatable  # lookarounds, named groups, flags
            inner = self._alternatives()
            if self.i >= self.stop or p[self.i] != ")":
                raise _Untranslatable
            self.i += 1
            return "(" + " | ".join(b or '""' for b in inner) + ")"
        if c == "[":
            return self._class()
        if c == ".":
            self.i += 1
            return _PLAIN
        if c == "\\":
            return self._escape_atom()
        if c in "^$*+?{)]}":
            if c in "]}":  # a literal ] or } outside a class (ECMA allows it)
                self.i += 1
                return _char_literal(c)
            raise _Untranslatable
        self.i += 1
        return _char_literal(c)

    def _escape_atom(self) -> str:
        c = self.p[self.i + 1]
        self.i += 2
        classes = {"d": "[0-9]", "w": "[a-zA-Z0-9_]", "s": '" "', "D": '[^0-9"\\\\\\x7F\\x00-\\x1F]',
                   "W": '[^a-zA-Z0-9_"\\\\\\x7F\\x00-\\x1F]', "S": _PLAIN.replace("\\x1F]", "\\x20]")}
        if c in classes:
            return classes[c]
        code = self._escaped_code(c)
        if code is None:
            raise _Untranslatable
        return _char_literal(chr(code))

    def _escaped_code(self, c: str) -> int | None:
        """The character an escape stands for (self.i is past `\\c`), or None."""
        simple = {"n": 10, "r": 13, "t": 9, "f": 12, "v": 11, "0": 0}
        if c in simple and not (c == "0" and self.i < self.stop and self.p[self.i].isdigit()):
            return simple[c]
        if c == "x":
            code = int(self.p[self.i:self.i + 2], 16)
            self.i += 2
            return code
        if c == "u":
            code = int(self.p[self.i:self.i + 4], 16)
            self.i += 4
            return code
        if not c.isalnum():
            return ord(c)
        return None  # \b \B \1 \k \p ...

    def _class(self) -> str:
        self.i += 1
        negated = self.p[self.i] == "^"
        if negated:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        while self.p[self.i] != "]":
            low = self._class_char(ranges)
            if low is None:
                continue
            if self.p[self.i] == "-" and self.p[self.i + 1] != "]":
                self.i += 1
                high = self._class_char(ranges)
                if high is None or high < low:
                    raise _Untranslatable
                ranges.append((low, high))
            else:
                ranges.append((low, low))
        self.i += 1
        if self.i > self.stop:
            raise _Untranslatable
        if negated:
            return "[^" + "".join(_class_range(a, b) for a, b in ranges) + '"\\\\\\x7F\\x00-\\x1F]'
        return _class_expression(ranges)

    def _class_char(self, ranges: list[tuple[int, int]]) -> int | None:
        """One character of a class (its code), or None after adding a shorthand class's ranges."""
        c = self.p[self.i]
        if c != "\\":
            self.i += 1
            return ord(c)
        e = self.p[self.i + 1]
        self.i += 2
        shorthands = {"d": [(48, 57)], "w": [(48, 57), (65, 90), (95, 95), (97, 122)], "s": [(32, 32)]}
        if e in shorthands:
            ranges.extend(shorthands[e])
            return None
        if e == "b":
            return 8
        code = self._escaped_code(e)
        if code is None:
            raise _Untranslatable
        return code

    def _quantified(self, atom: str) -> str:
        if self.i >= self.stop:
            return atom
        c = self.p[self.i]
        if c in "*+?":
            self.i += 1
            self._lazy()
            return f"{_group(atom)}{c}"
        if c == "{":
            m = re.match(r"\{(\d+)(,(\d*))?\}", self.p[self.i:self.stop])
            if m is None:
                raise _Untranslatable
            self.i += m.end()
            self._lazy()
            low = int(m.group(1))
            high = low if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
            if low > MAX_REPEAT or (high is not None and (high > MAX_REPEAT or high < low)):
                raise _Untranslatable
            if high == low:
                return f"{_group(atom)}{{{low}}}" if low != 1 else atom
            return f"{_group(atom)}{{{low},{'' if high is None else high}}}"
        return atom

    def _lazy(self) -> None:
        if self.i < self.stop and self.p[self.i] == "?":
            self.i += 1  # lazy or greedy: the same strings match the whole pattern
        if self.i < self.stop and self.p[self.i] in "*+{":
            raise _Untranslatable


def _group(expr: str) -> str:
    simple = re.fullmatch(r'\[(?:[^\]\\]|\\.)*\]|"(?:[^"\\]|\\.)*"|[a-z0-9-]+|\(.*\)', expr)
    if simple and (not expr.startswith("(") or _balanced_outer(expr)):
        return expr
    return f"({expr})"


def _balanced_outer(expr: str) -> bool:
    """Whether the parentheses that open `expr` close at its end (outside literals and classes)."""
    depth, i = 0, 0
    while i < len(expr):
        c = expr[i]
        if c in "\"[":
            close = '"' if c == '"' else "]"
            i += 1
            while expr[i] != close:
                i += 2 if expr[i] == "\\" else 1
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0 and i != len(expr) - 1:
                return False
        i += 1
    return True


def _char_literal(ch: str) -> str:
    """A GBNF literal for the JSON text of one character (a quote, a backslash, a control
    character are written escaped, as in JSON)."""
    return gbnf_literal(json.dumps(ch, ensure_ascii=False)[1:-1])


def _class_range(low: int, high: int) -> str:
    return _class_char(low) if low == high else f"{_class_char(low)}-{_class_char(high)}"


def _class_char(code: int) -> str:
    ch = chr(code)
    if ch.isalnum() and code < 128:
        return ch
    if code < 0x100:
        return f"\\x{code:02X}"
    if code < 0x10000:
        return f"\\u{code:04X}"
    return f"\\U{code:08X}"


def _class_expression(ranges: list[tuple[int, int]]) -> str:
    """Characters in `ranges` as they appear in a JSON string: plain ones in a class, a quote and
    a backslash as their escapes, control characters left out."""
    plain: list[tuple[int, int]] = []
    escaped: list[str] = []
    for low, high in ranges:
        for special in (0x22, 0x5C):
            if low <= special <= high:
                escaped.append(_char_literal(chr(special)))
        for a, b in _subtract((low, high), [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x7F, 0x7F)]):
            plain.append((a, b))
    parts = (["[" + "".join(_class_range(a, b) for a, b in plain) + "]"] if plain else []) + \
        list(dict.fromkeys(escaped))
    if not parts:
        raise _Untranslatable
    return parts[0] if len(parts) == 1 else "(" + " | ".join(parts) + ")"


def _subtract(span: tuple[int, int], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = [span]
    for h_low, h_high in holes:
        pieces = [((a, min(b, h_low - 1)), (max(a, h_high + 1), b)) for a, b in out]
        out = [piece for pair in pieces for piece in pair if piece[0] <= piece[1]]
    return out
