"""meshd: the Quorum node daemon.

`meshd` with no arguments runs a single-node mesh in the default data dir with the default model
and serves the OpenAI API on http://127.0.0.1:8080/v1. The first run creates everything; later
runs resume from the Raft journal. Ctrl-C stops it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from mesh.core.config import ConfigError, MeshConfig, load_config
from mesh.core.logs import setup_logging
from mesh.security.datadir import DataDir, default_data_dir

log = logging.getLogger("quorum.meshd")

COMMANDS = {
    "init": "create a new mesh in the data dir and print a join token",
    "start": "run a node that was initialised or joined before",
    "join": "join an existing mesh through any member, then run",
    "leave": "drain this (running) node's shards and take it out of the mesh",
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, default=None,
                        help="where this node keeps everything (default: $MESH_DATA_DIR or ~/.local/share/quorum)")
    common.add_argument("--listen", metavar="HOST:PORT", default=None,
                        help="HTTP address of the gateway and control API (default 127.0.0.1:8080); "
                             "gRPC and Raft take the next two ports")
    common.add_argument("--advertise", metavar="HOST", default=None,
                        help="host other members reach this node on (default: the --listen host)")
    common.add_argument("--config", type=Path, default=None,
                        help="mesh.toml to read (default: $MESH_CONFIG, else DATA_DIR/mesh.toml, else built-in)")
    common.add_argument("--name", default=None, help="this node's name (default: the host name)")
    common.add_argument("--threads", type=int, default=None, help="llama.cpp threads per shard (0: the physical cores)")
    common.add_argument("--memory-budget", type=int, default=None, metavar="MIB",
                        help="the most memory this node gives to models, in MiB (node.memory_budget_mib; "
                             "0: whatever it has free); a model that fits no member is split across several")
    common.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    common.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and services)")
    common.add_argument("--backend", default="llama", choices=["llama", "null"], help=argparse.SUPPRESS)

    p = argparse.ArgumentParser(
        prog="meshd", parents=[common],
        description="Quorum node daemon. With no command: a single-node mesh (created on first run) serving "
                    "the default model through an OpenAI-compatible API on http://127.0.0.1:8080/v1.",
        epilog="Environment: MESH_DATA_DIR sets the data dir, MESH_CONFIG the mesh.toml to read.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        cmd = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        if name == "join":
            where = cmd.add_mutually_exclusive_group(required=True)
            where.add_argument("--peer", metavar="HOST:PORT", help="HTTP address of any member")
            where.add_argument("--discover", action="store_true",
                               help="find a member on the LAN by mDNS ([discovery] in mesh.toml) and join through it")
            cmd.add_argument("--discover-timeout", type=_seconds, default=5.0, metavar="SECONDS",
                             help="how long --discover browses the LAN for members (default 5)")
            cmd.add_argument("--token", default=None,
                             help="join token from `meshctl token create` (not needed to rejoin)")
            cmd.add_argument("--witness", action="store_true",
                             help="join as a witness: votes in Raft, keeps the log, serves no model "
                                  "(the default on OpenWrt routers)")
    return p


def main(argv: list[str] | None = None) -> int:
    _slim_process()
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    dd = DataDir((args.data_dir or default_data_dir()).expanduser())
    record = dd.record() if (dd.path / "node.json").exists() else None
    try:
        config = _config(args, dd, record)
    except ConfigError as exc:
        print(f"meshd: {exc}", file=sys.stderr)
        return 2
    from mesh.core.errors import StartupError

    failed = False
    try:
        if args.command == "leave":
            return _leave(config, dd)
        return _run(_main(args, dd, config))
    except* StartupError as group:
        for exc in group.exceptions:
            print(f"meshd: {exc}", file=sys.stderr)
        failed = True
    return 1 if failed else 0


def _config(args, dd: DataDir, record) -> MeshConfig:
    path = args.config or (Path(os.environ["MESH_CONFIG"]) if os.environ.get("MESH_CONFIG") else None) \
        or dd.config_file
    listen = args.listen or (record.listen if record is not None and record.listen else None)
    advertise = args.advertise or (record.advertise if record is not None else None)
    return load_config(path).with_overrides(listen=listen, threads=args.threads, advertise=advertise,
                                            memory_budget_mib=args.memory_budget)


async def _main(args, dd: DataDir, config: MeshConfig) -> None:
    from mesh.core.errors import StartupError
    from mesh.node.bootstrap import init_mesh, join_mesh
    from mesh.node.daemon import NodeDaemon, NodeOptions

    dd.prepare()
    if args.command == "init":
        record, token = await init_mesh(dd, config, args.name)
        print(f"created mesh {record.mesh_id} in {dd.path}\n\nstart it:  meshd start --data-dir {dd.path}\n"
              f"add a device:  meshd join --peer {config.node.http_address} --token {token} --data-dir DIR\n"
              f"join token (valid 24 h): {token}\n"
              f"admin credential (meshctl; this member's, kept in {dd.path / 'admin.token'}; "
              f"`meshctl admin create NAME` makes one per operator): {dd.admin_token()}")
        return
    if args.command == "join":
        record = dd.record(args.name)
        if not record.joined and not args.token:
            raise StartupError("--token is required to join a mesh for the first time")
        args.witness = _witness(args.witness)
        if args.discover and not record.joined:
            await _join_discovered(args, dd, config)
        else:
            await join_mesh(dd, config, args.peer, args.token or "", args.name, args.witness)
    elif args.command is None and not dd.record(args.name).joined:
        await init_mesh(dd, config, args.name)  # `meshd` alone: a single-node mesh, created on first run
    elif args.command == "start" and not dd.record().joined:
        raise StartupError(f"{dd.path} holds no mesh: run `meshd init` or `meshd join` first")
    opts = NodeOptions(data_dir=dd.path, config=config, backend=args.backend,
                       progress=not args.no_progress and sys.stderr.isatty())
    await _serve(NodeDaemon(opts))


async def _join_discovered(args, dd: DataDir, config: MeshConfig) -> None:
    """`meshd join --discover`: browse the LAN, then join through the members found, in order, exactly
    as --peer would, until one accepts the token. Only members advertising the CA fingerprint the token
    carries are candidates (and the join checks the CA certificate itself before sending the token)."""
    from mesh.cluster.discovery import DiscoveryError, browse, join_first
    from mesh.core.errors import StartupError
    from mesh.node.bootstrap import join_mesh
    from mesh.security.tokens import BadToken, split_token

    service = config.discovery.service
    try:
        ca = split_token(args.token)[1]
    except BadToken as exc:
        raise StartupError(f"cannot join: {exc}") from None
    try:
        found = await browse(service, config.node.host, args.discover_timeout, ca=ca)
    except DiscoveryError as exc:
        raise StartupError(f"{exc}; join with --peer HOST:PORT instead") from None
    if not found:
        raise StartupError(f"no member of the token's mesh answered on the LAN ({service}) within "
                           f"{args.discover_timeout:g} s; is it running with [discovery] advertise = true? "
                           "Else use --peer HOST:PORT")
    await join_first(found, lambda peer: join_mesh(dd, config, peer, args.token, args.name, args.witness),
                     StartupError)


def _witness(flag: bool) -> bool:
    """--witness, or the default for router-class devices (they never hold a model shard)."""
    from mesh.cluster.witness import ROUTER_CLASS, joins_as_witness

    if not flag and joins_as_witness(False):
        log.info("this device is a router (%s): joining as a witness", ROUTER_CLASS)
        return True
    return flag


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 600:
        raise argparse.ArgumentTypeError(f"expected seconds between 0 and 600, got {text}")
    return value


def _run(coro) -> int:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not built for every platform); asyncio's loop works too
        uvloop = None
    (uvloop.run if uvloop is not None else asyncio.run)(coro)
    return 0


async def _serve(daemon) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    trimming = asyncio.create_task(_trim_heap(), name="heap-trim")
    try:
        await daemon.run(stop)
    finally:
        trimming.cancel()
        await asyncio.gather(trimming, return_exceptions=True)  # cancelled on purpose


M_ARENA_MAX = -8  # glibc mallopt(3)
TRIM_FIRST_S, TRIM_EVERY_S = 15.0, 600.0


def _libc():
    """glibc, or None where malloc is another (musl on OpenWrt, macOS): the settings below are glibc's."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # no glibc here: nothing to tune, meshd runs the same
        return None


def _slim_process() -> None:
    """Start-up choices that keep meshd small (a witness on a router; README, Footprints)."""
    # httpx imports its command-line client when it can (click, pygments, rich where installed); meshd never
    # runs it. None in sys.modules makes that import fail as if they were missing, which httpx expects.
    sys.modules.setdefault("httpx._main", None)
    libc = _libc()
    if libc is not None:  # each thread that allocates gets an arena of its own otherwise (up to 8 x cores)
        libc.mallopt(M_ARENA_MAX, 2)


async def _trim_heap() -> None:
    """Hands the heap's free pages back to the system once start-up's garbage is freed, then now and then."""
    libc = _libc()
    if libc is None:
        return
    await asyncio.sleep(TRIM_FIRST_S)
    while True:
        libc.malloc_trim(0)
        await asyncio.sleep(TRIM_EVERY_S)


def _leave(config: MeshConfig, dd: DataDir) -> int:
    import httpx

    if not (dd.path / "node.pem").exists():
        print(f"meshd: {dd.path} belongs to no mesh: nothing to leave", file=sys.stderr)
        return 1
    https = config.gateway.tls != "off"
    url = f"{'https' if https else 'http'}://{config.node.http_address}/control/v1/leave"
    verify = True
    if https and config.gateway.tls == "mesh":  # its certificate is the mesh CA's
        import ssl

        verify = ssl.create_default_context(cafile=str(dd.path / "ca.pem"))
    try:
        reply = httpx.post(url, timeout=180, headers={"Authorization": f"Bearer {dd.admin_token()}"}, verify=verify)
    except httpx.HTTPError as exc:
        print(f"meshd: cannot reach this node at {url} ({exc}); is it running?", file=sys.stderr)
        return 1
    if reply.status_code != 200:
        print(f"meshd: leave failed: HTTP {reply.status_code}: {reply.text[:300]}", file=sys.stderr)
        return 1
    print(f"{reply.json()['left']} left the mesh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
