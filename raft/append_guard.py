"""Raft's rule for AppendEntries on a follower, which pysyncobj 0.3.17 does not keep: delete an existing entry
(and those after it) only when it conflicts with a new one, same index and another term (Raft §5.3, step 3).

pysyncobj deletes every entry after `prevLogIdx` whenever the follower has more, then appends what the message
carries. A leader that sends again a range the follower already holds (after a reset, a reconnection, or a batch
shorter than the follower's log) thus makes the follower drop entries it has already applied ("truncating
already-applied log entries", a CRITICAL log under load) and lowers its commit index below them until the rest
comes again. The entries come back the same, since applied entries are committed, but meanwhile the follower's log
is shorter than what it applied, and its journal rewrites them.

`trim(message, ours)` takes an append_entries message and the follower's entries from `prevLogIdx` on (pysyncobj's
(command, index, term) tuples) and says what to do:
- ("pass", message): pysyncobj's handling is Raft's here (nothing of ours beyond prevLogIdx, no entry at
  prevLogIdx, another term there, or a chunked transmission);
- ("pass", trimmed): the entries the follower already holds are dropped from the front and prevLogIdx/prevLogTerm
  move past them, so pysyncobj deletes only from the first conflicting entry on;
- ("known", verified): every entry the message carries is already here, and the follower's log goes further: it
  keeps its log, answers success up to `verified` (the last index the message vouched for), and takes the
  leader's commit index no further than that (entries beyond it are not yet known to be the leader's).
"""

from __future__ import annotations

from typing import Any, Sequence


def trim(message: dict, ours: Sequence[tuple[Any, int, int]]) -> tuple[str, Any]:
    if "transmission" in message or "prevLogIdx" not in message:
        return "pass", message
    if len(ours) < 2 or ours[0][2] != message["prevLogTerm"]:
        return "pass", message
    entries = message.get("entries") or []
    held = 0
    while held < len(entries) and held + 1 < len(ours) and _same(entries[held], ours[held + 1]):
        held += 1
    if held < len(entries):
        if not held:
            return "pass", message
        last = entries[held - 1]
        return "pass", {**message, "entries": entries[held:], "prevLogIdx": last[1], "prevLogTerm": last[2]}
    return "known", entries[-1][1] if entries else message["prevLogIdx"]


def _same(a: tuple, b: tuple) -> bool:
    return a[1] == b[1] and a[2] == b[2]
