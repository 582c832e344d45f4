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
