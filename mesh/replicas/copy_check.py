"""Whether this member's copy of a split model's GGUF is the mesh's (sha256), found out off the event loop.

A stage member that keeps its own copy of a split model's file must not serve a pipeline from a copy that differs
(mesh/replicas/splits.py). Hashing a multi-GB file takes minutes on a Pi, so it never runs on meshd's event loop nor
inside a reconciler step: `verdict()` answers at once, from what it already knows, and otherwise starts the hashing
in a thread (asyncio.to_thread), in a task of its own, and says "not known yet"; `on_verdict()` is called on the
loop once the verdict is in, so the caller asks again. The verdict is kept per (path, size, mtime, sha256): asking
again costs a stat, and a file that changes is hashed again. A match leaves shards/model_files.py's stamp beside
the file, so a restarted meshd does not hash it again either.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Callable

from shards.model_files import ModelFileError, VerifyStopped, is_verified, verify

log = logging.getLogger("quorum.copy-check")

Key = tuple[str, int, int, str]  # path, size, mtime_ns, sha256


class CopyCheck:
    def __init__(self, on_verdict: Callable[[], None]) -> None:
        self.on_verdict = on_verdict
        self._verdicts: dict[str, tuple[Key, str | None]] = {}  # model -> (what was hashed, why it differs or None)
        self._running: dict[str, tuple[Key, asyncio.Task, threading.Event]] = {}  # model -> its hashing in flight

    def verdict(self, model: str, path: Path, sha256: str) -> tuple[bool, str | None]:
        """(known, reason): (True, None) when the copy at `path` is the mesh's or there is none (the head then sends
        the tensors); (True, why) when it differs; (False, None) while it is being hashed (started here if need
        be: `on_verdict()` follows)."""
        try:
            st = path.stat()
        except OSError:  # no copy here: nothing to check
            return True, None
        key = (str(path), st.st_size, st.st_mtime_ns, sha256)
        known = self._verdicts.get(model)
        if known is not None and known[0] == key:
            return True, known[1]
        if is_verified(path, sha256):  # stamped by an earlier hash at this very size and mtime
            self._verdicts[model] = (key, None)
            return True, None
        if model not in self._running:
            stop = threading.Event()
            task = asyncio.create_task(self._hash(model, key, path, sha256, stop), name=f"copy-check-{model}")
            self._running[model] = (key, task, stop)
            task.add_done_callback(lambda t, m=model: self._ended(m, t))
            log.info("checking this member's copy of %s for %s (sha256)", path.name, model)
        return False, None

    def checking(self, model: str) -> bool:
        return model in self._running

    def keep(self, models: set[str]) -> None:
        """Forgets the verdicts of models not in `models`, and stops hashing for them."""
        for model in set(self._verdicts) - models:
            del self._verdicts[model]
        for model in set(self._running) - models:
            self._running[model][2].set()

    async def close(self) -> None:
        """Stops every hashing in flight (its thread ends at its next block) and waits for its task."""
        running = list(self._running.values())
        for _, _, stop in running:
            stop.set()
        await asyncio.gather(*(task for _, task, _ in running), return_exceptions=True)  # _hash logs its own end

    async def _hash(self, model: str, key: Key, path: Path, sha256: str, stop: threading.Event) -> None:
        try:
            await asyncio.to_thread(verify, path, sha256, False, stop)
        except VerifyStopped:  # no longer wanted (keep, close): no verdict
            return
        except (ModelFileError, OSError) as exc:  # a mismatch, or a copy that cannot be read (gone meanwhile)
            self._verdicts[model] = (key, f"this member's copy of {path.name} differs from the mesh's "
                                          f"(sha256 check: {exc})")
        else:
            self._verdicts[model] = (key, None)
            log.info("this member's copy of %s matches the mesh's sha256", path.name)
        finally:
            if self._running.get(model, (None, None))[1] is asyncio.current_task():
                del self._running[model]  # before the caller asks again: a changed file is then hashed anew
        self.on_verdict()

    def _ended(self, model: str, task: asyncio.Task) -> None:
        if self._running.get(model, (None, None))[1] is task:
            del self._running[model]
        if not task.cancelled() and task.exception() is not None:  # a bug: said, and the next ask hashes again
            log.error("checking the copy for %s ended in %r", model, task.exception())
