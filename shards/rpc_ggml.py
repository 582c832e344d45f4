"""ctypes bindings to the ggml that llama-cpp-python bundles, for its RPC backend (layer split).

Only what a stage (shards/rpc_stage.py) and a head (shards/rpc_head.py) need. The functions come
from the same libggml that llama_cpp loaded, so head, stage and llama.cpp share one build: the RPC
protocol checks its version on connect, and a stage from another build is refused.

llama-cpp-python has to be built with `-DGGML_RPC=on` (libggml-rpc.so beside the other libraries in
llama_cpp/lib); `available()` says whether it was, and why not.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

DEVICE_TYPE_CPU = 0  # enum ggml_backend_dev_type


class RpcUnavailable(RuntimeError):
    """This llama-cpp-python was built without the RPC backend (or has no bundled ggml)."""


def lib_dir() -> Path:
    """llama_cpp/lib, found without importing llama_cpp (meshd itself never loads the model library)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        raise ImportError("no module named 'llama_cpp'")
    return Path(spec.origin).resolve().parent / "lib"


def available() -> str | None:
    """None when the RPC backend is in this build; otherwise the reason it is not."""
    try:
        directory = lib_dir()
    except ImportError as exc:
        return f"llama-cpp-python is not installed: {exc}"
    if not any(directory.glob("libggml-rpc.*")) and not any(directory.glob("ggml-rpc.*")):
        return f"llama-cpp-python was built without -DGGML_RPC=on (no libggml-rpc in {directory})"
    try:
        ggml()
    except (OSError, AttributeError, RpcUnavailable) as exc:
        return f"the bundled ggml has no usable RPC backend: {exc}"
    return None


@lru_cache(maxsize=1)
def ggml() -> ctypes.CDLL:
    """The bundled libggml with the signatures used here (loaded once; llama_cpp loads the same file)."""
    import llama_cpp  # noqa: F401  (loads libggml and its backends the way llama.cpp will use them)

    directory = lib_dir()
    candidates = sorted(directory.glob("libggml.so*")) + sorted(directory.glob("libggml.dylib"))
    if not candidates:
        raise RpcUnavailable(f"no libggml in {directory}")
    lib = ctypes.CDLL(str(candidates[0]))
    p, c_size = ctypes.c_void_p, ctypes.c_size_t
    _sig(lib.ggml_backend_reg_by_name, p, ctypes.c_char_p)
    _sig(lib.ggml_backend_reg_get_proc_address, p, p, ctypes.c_char_p)
    _sig(lib.ggml_backend_reg_dev_count, c_size, p)
    _sig(lib.ggml_backend_reg_dev_get, p, p, c_size)
    _sig(lib.ggml_backend_register, None, p)
    _sig(lib.ggml_backend_dev_by_type, p, ctypes.c_int)
    _sig(lib.ggml_backend_dev_name, ctypes.c_char_p, p)
    _sig(lib.ggml_backend_dev_description, ctypes.c_char_p, p)
    _sig(lib.ggml_backend_dev_buffer_type, p, p)
    if not lib.ggml_backend_reg_by_name(b"RPC"):
        raise RpcUnavailable("ggml has no backend registered as \"RPC\"")
    return lib


def _sig(fn, restype, *argtypes) -> None:
    fn.restype = restype
    fn.argtypes = list(argtypes)


def rpc_proc(name: str, restype, *argtypes):
    """A function of the RPC backend, found the way llama.cpp's common/arg.cpp finds it (the backend
    may be a dynamically loaded module whose symbols are not exported to us)."""
    lib = ggml()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    address = lib.ggml_backend_reg_get_proc_address(reg, name.encode())
    if not address:
        raise RpcUnavailable(f"the RPC backend does not export {name}")
    return ctypes.CFUNCTYPE(restype, *argtypes)(address)


def start_server_fn():
    """ggml_backend_rpc_start_server(endpoint, cache_dir, n_threads, n_devices, devices): serves
    one client at a time until the process ends (as llama.cpp's tools/rpc finds it)."""
    return rpc_proc("ggml_backend_rpc_start_server", None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                    ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p))


def add_server_fn():
    """ggml_backend_rpc_add_server(endpoint) -> a registry holding the server's devices, or NULL when
    the server is unreachable or speaks another protocol version."""
    return rpc_proc("ggml_backend_rpc_add_server", ctypes.c_void_p, ctypes.c_char_p)


# The RPC handshake as this build speaks it (llama-cpp-python 0.3.36, RPC protocol 7.0.0; read off the
# wire between this build's client and server): command HELLO (0x0e) with a 24-byte zero payload; the
# reply is a little-endian u64 size, then u32 major, minor, patch and padding. Re-check on an upgrade.
_HELLO = bytes([0x0E]) + (24).to_bytes(8, "little") + bytes(24)
_MAX_HELLO_REPLY = 1024


def build_protocol() -> tuple[int, int, int] | None:
    """RPC_PROTO_{MAJOR,MINOR,PATCH}_VERSION of this build, from the header it installs (None if absent)."""
    import re

    header = lib_dir().parent.parent / "include" / "ggml-rpc.h"
    try:
        text = header.read_text()
    except OSError:
        return None
    found = [re.search(rf"#define\s+RPC_PROTO_{part}_VERSION\s+(\d+)", text) for part in ("MAJOR", "MINOR", "PATCH")]
    return tuple(int(m.group(1)) for m in found) if all(found) else None  # type: ignore[return-value]


def hello(endpoint: str, timeout: float = 5.0) -> tuple[int, int, int]:
    """The protocol version the RPC server at host:port answers with. Raises OSError (unreachable,
    closed, too slow) or ValueError (not an RPC server of this protocol family). A probe in Python,
    because ggml's own client aborts the process on an unreachable server (GGML_ABORT, "Failed to
    connect"). It holds the server's one client slot only for the exchange."""
    import socket

    host, _, port = endpoint.rpartition(":")
    host = host[1:-1] if host.startswith("[") else host
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(_HELLO)
        size = int.from_bytes(_recv_exactly(sock, 8), "little")
        if not 12 <= size <= _MAX_HELLO_REPLY:
            raise ValueError(f"{endpoint} answered HELLO with a {size}-byte reply")
        body = _recv_exactly(sock, size)
    return tuple(int.from_bytes(body[i:i + 4], "little") for i in (0, 4, 8))  # type: ignore[return-value]


def _recv_exactly(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the peer closed the connection during the RPC handshake")
        data += chunk
    return data
