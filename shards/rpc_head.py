"""The head of a layer-split model: llama.cpp here, its last layers on RPC stages (shards/rpc_stage.py).

A head registers each stage's endpoint with ggml's RPC backend and loads the model with
`model_params.devices` naming those RPC devices and `n_gpu_layers` = the layers they hold, so the
last layers run on the stages in order and the rest (with the embeddings and the output layer) here.
Two measured traps (docs: /work/shared/LIBRARY-NOTES.md, issue #17) shape it:
- with `devices` left NULL, a registered RPC device is ignored and every layer stays on the CPU;
- weight repacking on the head (`use_extra_bufts`) runs other CPU kernels than the stage runs, and the
  text differs from the whole model's: the head loads with it off.

Everything above the model is the ordinary LlamaBackend (shards/backend_llama.py), unchanged: it is
built while the model load is redirected (see `_split_load`), so generation, replay and grammars
work on a split model as on a whole one.

A head must be a process of its own (a shard process): ggml registrations are process-global and
cannot be removed, and a stage that dies mid-step aborts the whole process (GGML_ABORT, "Remote RPC
server crashed or returned malformed response"). Recovery is a fresh head over a new plan.

    python -m shards.rpc_head --model PATH [--stage 127.0.0.1:PORT=LAYERS ...] --prompt TEXT

runs one greedy generation and prints JSON lines: {"ready": ...} after the load (with where the
weights went), {"token": id} per token, then {"done": ...} with timings. The tests and the
benchmark drive heads through it; meshd will drive heads through shards/host.py.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

log = logging.getLogger("quorum.rpc-head")

_lock = threading.Lock()  # the load redirection below is process-global
_devices: dict[str, int] = {}  # endpoint -> ggml device; registrations last as long as the process
_BUFFER = re.compile(r"(\S+) model buffer size\s*=\s*([0-9.]+) MiB")


class _BuftOverride(ctypes.Structure):  # struct llama_model_tensor_buft_override (llama.h)
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


# Tensors kept on the head whatever the split: the output layer and, for models that tie it to the
# input embeddings (Gemma), the embedding matrix it duplicates. llama.cpp counts the output as one more
# layer and puts it on the last device; on a stage it would cost the stage the whole vocabulary matrix
# (170 MiB of the default model's 241) and the wire a full row of logits per token (262k floats, 1 MiB)
# instead of one hidden state (640 floats).
HEAD_TENSORS = (rb"^output", rb"^token_embd\.weight$")


class StageUnreachable(RuntimeError):
    """A stage's RPC server did not answer, or speaks another protocol version (another build)."""


def check_stage(endpoint: str, timeout: float = 5.0) -> tuple[int, int, int]:
    """The stage's protocol version, checked against this build's; StageUnreachable otherwise.
    ggml's own client aborts the process on both faults: this turns them into an error first."""
    from shards import rpc_ggml

    try:
        version = rpc_ggml.hello(endpoint, timeout)
    except (OSError, ValueError) as exc:
        raise StageUnreachable(f"no RPC server answers at {endpoint}: {exc}") from exc
    ours = rpc_ggml.build_protocol()
    if ours is not None and version[0] != ours[0]:
        raise StageUnreachable(f"the stage at {endpoint} speaks RPC protocol {'.'.join(map(str, version))}, "
                               f"this build {'.'.join(map(str, ours))}: run the same llama.cpp build everywhere")
    return version


def wait_for_stages(stages: Sequence["Stage"], timeout: float, every: float = 0.25) -> None:
    """Returns once every stage answers the probe (check_stage); StageUnreachable with the last reason after
    `timeout` s. A protocol mismatch is raised at once: waiting would not change the stage's build."""
    deadline = time.monotonic() + timeout
    for stage in stages:
        while True:
            try:
                check_stage(stage.endpoint, timeout=min(5.0, max(0.5, deadline - time.monotonic())))
                break
            except StageUnreachable as exc:
                if "speaks RPC protocol" in str(exc) or time.monotonic() + every > deadline:
                    raise
                log.info("waiting for the stage at %s: %s", stage.endpoint, exc)
                time.sleep(every)  # polling a condition (the stage listening), bounded by the deadline


@dataclass(frozen=True)
class Stage:
    endpoint: str  # host:port of the stage's RPC server, as this process reaches it
    layers: int  # how many of the model's last layers it holds (stages in pipeline order)

    @classmethod
    def parse(cls, text: str) -> "Stage":
        endpoint, sep, layers = text.rpartition("=")
        if not sep or not endpoint or not layers.isdigit() or int(layers) < 1:
            raise ValueError(f"a stage is ENDPOINT=LAYERS, e.g. 127.0.0.1:5000=9: {text!r}")
        return cls(endpoint, int(layers))


@dataclass
class SplitLoad:
    """A backend over a split model, and where llama.cpp put the weights (MiB per buffer, e.g.
    {"CPU_Mapped": 160.6, "RPC0[127.0.0.1:5000]": 40.1})."""

    backend: object  # shards.backend_llama.LlamaBackend
    buffers: dict[str, float] = field(default_factory=dict)
    load_s: float = 0.0


def connect_stage(endpoint: str) -> int:
    """The ggml device of the RPC server at `endpoint`, registered once per process."""
    from shards import rpc_ggml

    with _lock:
        if endpoint in _devices:
            return _devices[endpoint]
        lib = rpc_ggml.ggml()
        check_stage(endpoint)  # a stage that dies between this check and the next line aborts us
        reg = rpc_ggml.add_server_fn()(endpoint.encode())
        if not reg:
            raise StageUnreachable(f"no RPC server of this build answers at {endpoint}")
        lib.ggml_backend_register(reg)
        if lib.ggml_backend_reg_dev_count(reg) < 1:
            raise StageUnreachable(f"the RPC server at {endpoint} offers no device")
        device = lib.ggml_backend_reg_dev_get(reg, 0)
        _devices[endpoint] = device
        log.info("stage %s: device %s", endpoint, lib.ggml_backend_dev_name(device).decode(errors="replace"))
        return device


@contextlib.contextmanager
def _split_load(devices: Sequence[int], layers: Sequence[int], output_on_head: bool = True
                ) -> Iterator[dict[str, float]]:
    """While active, every llama_cpp model load in this process places the last sum(layers)
    repeating layers on `devices` (in order, layers[i] each) with repacking off, the output layer
    here (HEAD_TENSORS) unless `output_on_head` is False (then on the last device), and the yielded
    dict fills with the weight buffers llama.cpp reports.

    llama-cpp-python 0.3.36 (pinned) builds `model_params` inside Llama.__init__ and takes neither
    `devices`, `tensor_buft_overrides` nor `use_extra_bufts`; every load goes through
    `_internals.LlamaModel(path_model=, params=)`, which this replaces for the duration (under a lock,
    in a head process that loads nothing else). Re-check on an upgrade of llama-cpp-python."""
    import llama_cpp
    import llama_cpp._internals as internals
    import llama_cpp._logger as llama_logger

    from shards import rpc_ggml

    original = internals.LlamaModel
    device_array = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)  # NULL-terminated
    # llama.cpp offloads the last n_gpu_layers "layers", the output counted as one after the blocks,
    # and deals them to devices by cumulative share: the last device's share counts the output too,
    # so every stage gets exactly its blocks.
    shares = [float(n) for n in layers[:-1]] + [float(layers[-1] + 1)] if layers else []
    split = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*shares)
    overrides = (_BuftOverride * (len(HEAD_TENSORS) + 1))()  # NULL-terminated
    if devices and output_on_head:
        lib = rpc_ggml.ggml()
        cpu_buft = lib.ggml_backend_dev_buffer_type(lib.ggml_backend_dev_by_type(rpc_ggml.DEVICE_TYPE_CPU))
        for slot, pattern in zip(overrides, HEAD_TENSORS):
            slot.pattern, slot.buft = pattern, cpu_buft
    buffers: dict[str, float] = {}

    class SplitModel(original):  # type: ignore[misc, valid-type]
        def __init__(self, *, path_model: str, params, verbose: bool = True) -> None:
            params.devices = ctypes.cast(device_array, ctypes.c_void_p)
            params.n_gpu_layers = sum(layers) + 1 if layers else 0
            params.split_mode = llama_cpp.LLAMA_SPLIT_MODE_LAYER
            params.tensor_split = ctypes.cast(split, ctypes.POINTER(ctypes.c_float))
            params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
            params.use_extra_bufts = False
            super().__init__(path_model=path_model, params=params, verbose=verbose)
            self._split_keepalive = (device_array, split, overrides)  # params point into these

    @llama_cpp.llama_log_callback
    def capture(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if match := _BUFFER.search(text.decode("utf-8", "replace")):
            buffers[match.group(1)] = buffers.get(match.group(1), 0.0) + float(match.group(2))

    with _lock:
        internals.LlamaModel = SplitModel
        llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
        try:
            yield buffers
        finally:
            llama_cpp.llama_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
            internals.LlamaModel = original


def _head_backend_class():
    """LlamaBackend for a head with stages: no KV checkpoints taken or restored. The KV cache of the stages'
    layers lives on the stages, and llama.cpp's state (de)serialisation reads and writes it a row at a time:
    one RPC round trip each (thousands per checkpoint; measured in the mesh: a 40-token answer took 4x as long
    with checkpoints every 8 tokens). A stream resumed from a split head, or onto one, prefills and replays
    instead, which is exact too (shards/backend_llama.py)."""
    from shards.backend_llama import LlamaBackend

    class SplitHeadBackend(LlamaBackend):
        def generate(self, prompt, sampling, seed, forced=(), resume_kv=b"", resume_kv_tokens=0,
                     checkpoints=False):
            return super().generate(prompt, sampling, seed, forced, b"", 0, False)

    return SplitHeadBackend


def open_split_backend(path: str, n_ctx: int, threads: int, stages: Sequence[Stage],
                       output_on_head: bool = True) -> SplitLoad:
    """LlamaBackend over the model at `path` with its last layers on `stages` (none: the whole model
    here, loaded the same way, repacking off: the reference a split must match token for token).
    Raises StageUnreachable if a stage does not answer."""
    from shards.backend_llama import LlamaBackend

    started = time.monotonic()
    devices = [connect_stage(s.endpoint) for s in stages]
    backend_class = _head_backend_class() if stages else LlamaBackend
    with _split_load(devices, [s.layers for s in stages], output_on_head) as buffers:
        backend = backend_class(path, n_ctx=n_ctx, threads=threads)
    return SplitLoad(backend, dict(buffers), time.monotonic() - started)


def open_backend(path: str, n_ctx: int, threads: int, stages: Sequence[Stage] = (), **_unused):
    """The backend-module entry point (shards.backend.load_backend's shape) for a split model."""
    return open_split_backend(path, n_ctx, threads, stages).backend


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shards.rpc_head", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--stage", action="append", default=[], type=Stage.parse, help="ENDPOINT=LAYERS")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--output-on-stage", action="store_true",
                        help="leave the output layer on the last stage (llama.cpp's default), for comparison")
    parser.add_argument("--repack", action="store_true",
                        help="load the whole model as LlamaBackend does (repacking on); no stages")
    parser.add_argument("--parent", type=int, default=None, help="pid whose death ends this process")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    from shards.child_process import die_with_parent, offer_to_oom_killer

    if args.parent is not None:
        die_with_parent(args.parent)
    offer_to_oom_killer()
    # A GGML_ABORT (a stage lost mid-step) would otherwise run gdb for a backtrace first: seconds more
    # before the supervisor sees the exit. faulthandler prints the Python stack either way.
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    out = os.fdopen(os.dup(1), "w", buffering=1)  # our JSON lines; C libraries' prints go to stderr
    os.dup2(2, 1)
    import faulthandler

    faulthandler.enable()
    if args.repack and args.stage:
        parser.error("--repack loads the whole model: no --stage with it")
    try:
        if args.repack:
            from shards.backend_llama import LlamaBackend

            started = time.monotonic()
            loaded = SplitLoad(LlamaBackend(args.model, n_ctx=args.n_ctx, threads=args.threads))
            loaded.load_s = time.monotonic() - started
        else:
            loaded = open_split_backend(args.model, args.n_ctx, args.threads, args.stage,
                                        output_on_head=not args.output_on_stage)
    except StageUnreachable as exc:
        sys.exit(f"rpc_head: {exc}")
    _generate(loaded, args, out)


def _generate(loaded: SplitLoad, args: argparse.Namespace, out) -> None:
    from shards.types import Sampling

    backend = loaded.backend
    out.write(json.dumps({"ready": True, "pid": os.getpid(), "load_s": round(loaded.load_s, 3),
                          "buffers": loaded.buffers}) + "\n")
    prompt = backend.tokenize(args.prompt, add_bos=True)
    started = time.monotonic()
    first = None
    count = 0
    for step in backend.generate(prompt, Sampling(temperature=0.0), seed=1):
        first = first or time.monotonic()
        count += 1
        out.write(json.dumps({"token": step.token}) + "\n")
        if count >= args.max_tokens or backend.is_end(step.token):
            break
    ended = time.monotonic()
    decode_s = ended - first if first else 0.0
    out.write(json.dumps({"done": True, "tokens": count, "ttft_s": round((first or ended) - started, 4),
                          "decode_tok_s": round((count - 1) / decode_s, 2) if count > 1 and decode_s else None})
              + "\n")
    backend.close()


if __name__ == "__main__":
    main()
