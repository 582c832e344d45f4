"""meshd: the Quorum node daemon.

`meshd` with no arguments runs a single-node mesh in the default data dir with the default model
and serves the OpenAI API on http://127.0.0.1:8080/v1. The first run creates everything; later
runs resume from the Raft journal. Ctrl-C stops it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from mesh.config import ConfigError, load_config
from mesh.datadir import DataDir, default_data_dir
from mesh.logs import setup_logging

log = logging.getLogger("quorum.meshd")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshd",
        description="Quorum node daemon. With no arguments: a single-node mesh serving the default "
                    "model through an OpenAI-compatible API on http://127.0.0.1:8080/v1.",
        epilog="Environment: MESH_DATA_DIR sets the data dir, MESH_CONFIG the mesh.toml to read.")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where this node keeps everything (default: $MESH_DATA_DIR or ~/.local/share/quorum)")
    p.add_argument("--listen", metavar="HOST:PORT", default=None,
                   help="HTTP address of the gateway and control API (default 127.0.0.1:8080); "
                        "Raft takes the port after next")
    p.add_argument("--config", type=Path, default=None,
                   help="mesh.toml to read (default: $MESH_CONFIG, else DATA_DIR/mesh.toml, else built-in defaults)")
    p.add_argument("--name", default=None, help="this node's name (default: the host name)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads per shard (0: half the cores)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and services)")
    p.add_argument("--backend", default="llama", choices=["llama", "null"], help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    data_dir = (args.data_dir or default_data_dir()).expanduser()
    config_path = args.config or _env_config() or DataDir(data_dir).config_file
    try:
        config = load_config(config_path).with_overrides(listen=args.listen, threads=args.threads)
    except ConfigError as exc:
        print(f"meshd: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not built for every platform); asyncio's loop works too
        uvloop = None
    runner = uvloop.run if uvloop is not None else asyncio.run
    from mesh.daemon import NodeDaemon, NodeOptions, StartupError

    opts = NodeOptions(data_dir=data_dir, config=config, name=args.name, backend=args.backend,
                       progress=not args.no_progress and sys.stderr.isatty())
    failures: list[BaseException] = []
    try:
        runner(_serve(NodeDaemon(opts)))
    except* StartupError as group:
        failures.extend(group.exceptions)
    for exc in failures:
        print(f"meshd: {exc}", file=sys.stderr)
    return 1 if failures else 0


async def _serve(daemon) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await daemon.run(stop)


def _env_config() -> Path | None:
    import os
    value = os.environ.get("MESH_CONFIG")
    return Path(value) if value else None


if __name__ == "__main__":
    sys.exit(main())
