"""The replicated state: typed commands, a pure apply(), and the pysyncobj node that carries them."""

import _socket as _c_socket
import os as _os
import socket as _socket
import sys as _sys
import types as _types

# pysyncobj 0.3.17's tcp_connection imports its win_inet_pton, which replaces socket.inet_ntop with a
# Windows-only ctypes version on every OS (its last line is not under `if os.name == 'nt'`): psutil's
# connection listing and anything else calling socket.inet_ntop in meshd would then fail. Here it is
# kept from loading off Windows, and undone if pysyncobj was imported before this package.
if _os.name != "nt":
    _sys.modules.setdefault("pysyncobj.win_inet_pton", _types.ModuleType("pysyncobj.win_inet_pton"))
    _socket.inet_ntop = _c_socket.inet_ntop

# pysyncobj's encryptor (the Fernet of its password) imports cryptography when pysyncobj is imported, 11.7 MB
# resident on a witness whose Raft port is TLS (raft/tls.py) with the password off. Here it is replaced, before
# pysyncobj loads, by a module with the same two names whose getEncryptor loads pysyncobj's own file (and so
# cryptography) at its first call: only a node with a password (tests, benchmarks) ever makes that call.
if "pysyncobj.encryptor" not in _sys.modules:
    import importlib.machinery as _machinery
    import importlib.util as _util

    def _get_encryptor(password):
        origin = _util.find_spec("pysyncobj").submodule_search_locations
        spec = _machinery.PathFinder.find_spec("pysyncobj.encryptor", origin)
        real = _util.module_from_spec(spec)
        spec.loader.exec_module(real)
        return real.getEncryptor(password)

    _encryptor = _types.ModuleType("pysyncobj.encryptor", "pysyncobj's encryptor, loaded at its first use (raft)")
    _encryptor.HAS_CRYPTO = _util.find_spec("cryptography") is not None
    _encryptor.getEncryptor = _get_encryptor
    _sys.modules["pysyncobj.encryptor"] = _encryptor
