"""meshctl: the operator's tool. Talks to the control API of any member, over HTTPS when the member's
gateway serves it (`--mesh https://HOST:PORT`, or `--ca FILE`): the certificate is checked against the
mesh CA (`--ca`, else ca.pem in the data dir, else the system's trust store), host name included. An
https address never falls back to plain HTTP, where the admin credential would cross in clear."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Callable

from mesh.cli.pipelines import pinned_split, pipeline_rows, stage_failures
from raft.vocab import MemberState, ShardState

DEFAULT_MESH = "127.0.0.1:8080"


class MeshError(RuntimeError):
    """The mesh could not be reached or refused the request; the message says which."""


def base_url(mesh: str) -> str:
    """`HOST:PORT` (plain HTTP), `http://HOST:PORT` or `https://HOST:PORT`, without a trailing slash."""
    return mesh.rstrip("/") if "://" in mesh else f"http://{mesh}"


def _call(mesh: str, path: str, body: dict | None = None, timeout: float = 30.0, retries: int = 5,
          admin: str | None = None, context: ssl.SSLContext | None = None) -> Any:
    """GET (body None) or POST a control request; retries briefly while leadership moves (503)."""
    url = f"{base_url(mesh)}{path}"
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {admin}"} if admin else {})}
    for attempt in range(retries + 1):
        request = urllib.request.Request(url, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            message = _error_message(exc)
            if exc.code == 503 and attempt < retries:
                time.sleep(min(2.0, float(exc.headers.get("retry-after") or 1)))
                continue
            raise MeshError(f"{message} (HTTP {exc.code})") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise MeshError(f"{mesh} presented a certificate this meshctl does not trust ({reason.verify_message}):"
                                f" pass --ca FILE, the mesh CA (ca.pem in a member's data dir, or GET "
                                f"/control/v1/ca), or --data-dir of a member") from None
            hint = ("; if its gateway serves HTTPS (gateway.tls), use --mesh https://HOST:PORT"
                    if url.startswith("http://") else "")
            raise MeshError(f"cannot reach the mesh at {mesh} ({reason or type(exc).__name__}); is meshd running? "
                            f"(--mesh HOST:PORT or MESH_ADDR){hint}") from None
    raise AssertionError("unreachable")


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return json.loads(exc.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return str(exc.reason)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _size(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def render_status(st: dict) -> str:
    raft = st["raft"]
    out = [f"mesh {st['mesh']['name'] or '?'} ({(st['mesh']['id'] or 'not initialised')[:12]})  "
           f"term {raft.get('term')}  commit {raft.get('commit_index')}  "
           f"quorum {'yes' if raft.get('has_quorum') else 'NO'}"
           f"  health: {st['health']['detail']}", ""]
    names = {m["node_id"]: m["name"] for m in st["members"]}
    members = []
    for m in st["members"]:
        p = m.get("profile", {})
        role = "witness" if m.get("witness") else ("leader" if m.get("leader") else "")
        members.append([m["name"], m["http_address"], p.get("device_class", "?"), _size(p.get("ram_total")),
                        p.get("cores", "?"), m["state"] + ("" if m.get("connected", True) else " (unreachable)"),
                        role])
    out.append(table(["MEMBER", "ADDRESS", "CLASS", "RAM", "CORES", "STATE", "ROLE"], members))
    out.append("")
    shards = [[s["role"], s["model"], names.get(s["node_id"], s["node_id"]), s["state"], s["detail"]]
              for s in st["shards"]]
    shards += [[u["role"], u["model"] or "-", "-", f"unplaced ({u['missing']})", u["reason"]] for u in st["unplaced"]]
    out.append(table(["ROLE", "MODEL", "NODE", "STATE", "DETAIL"], shards))
    out.append("")
    out.append(table(["ROLE", "DESIRED", "READY", "ON"], replica_rows(st, names)))
    if st.get("splits"):
        out.append("")
        out.append(table(["PIPELINE", "HEAD (LAYERS)", "STAGES (LAYERS, STATE)", "PLANNED", "STATE"],
                         pipeline_rows(st, names)))
        out.extend(stage_failures(st, names))
    processes = [[p["role"], p["model"], p["state"], p["pid"] or "-", _size(p["rss_bytes"]), p["restarts"],
                  p["detail"]] for p in st.get("local_shards", [])]
    if processes:
        out.append("")
        out.append(f"shard processes on {st['node']['name']}:")
        out.append(table(["ROLE", "MODEL", "STATE", "PID", "RSS", "RESTARTS", "DETAIL"], processes))
    return "\n".join(out)


def replica_rows(st: dict, names: dict[str, str]) -> list[list[Any]]:
    """Replicas per role: desired (witness: the witness members), ready, and where."""
    rows = []
    roles = sorted({*st.get("replicas", {}), *(s["role"] for s in st["shards"])} - {"witness"})
    for role in roles:
        ready = [names.get(s["node_id"], s["node_id"]) for s in st["shards"]
                 if s["role"] == role and s["state"] == ShardState.READY]
        rows.append([role, st.get("replicas", {}).get(role, 0), len(ready), ", ".join(sorted(ready)) or "-"])
    witnesses = sorted(m["name"] for m in st["members"] if m.get("witness") and m["state"] != MemberState.GONE)
    rows.append(["witness", "-", len(witnesses), ", ".join(witnesses) or "-"])
    return rows


def _stage_arg(text: str) -> dict:
    name, sep, layers = text.rpartition("=")
    if not sep or not name or not layers.isdigit() or int(layers) < 1:
        raise argparse.ArgumentTypeError(f"a stage is NAME=LAYERS (e.g. pi2=9), got {text!r}")
    return {"node": name, "layers": int(layers)}


def render_models(models: list[dict]) -> str:
    return table(["MODEL", "FILE", "SIZE", "ROLES", "CONTEXT", "ON"],
                 [[m["name"], m["file"], _size(m["size"]), ",".join(m["roles"]), m["context_length"],
                   ", ".join(m["holders"]) or "-"] for m in models])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshctl", description="Inspect and steer a Quorum mesh through any member.")
    p.add_argument("--mesh", default=os.environ.get("MESH_ADDR", DEFAULT_MESH),
                   help=f"HOST:PORT of any member, or https://HOST:PORT when its gateway serves HTTPS "
                        f"(default: $MESH_ADDR or {DEFAULT_MESH})")
    p.add_argument("--ca", default=os.environ.get("MESH_CA"),
                   help="the CA certificate (PEM) an HTTPS gateway's certificate must chain to; implies https "
                        "(default: $MESH_CA, else ca.pem in --data-dir when --mesh is https://..., else the "
                        "system's trust store)")
    p.add_argument("--admin-token", default=os.environ.get("QUORUM_ADMIN_TOKEN"),
                   help="the mesh's admin credential (default: $QUORUM_ADMIN_TOKEN, else admin.token in --data-dir)")
    p.add_argument("--data-dir", default=None,
                   help="a member's data dir to read admin.token from (default: $MESH_DATA_DIR or "
                        "~/.local/share/quorum)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = sub.add_parser("status", help="members, shards, leader and health")
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")
    models = sub.add_parser("models", help="the model catalog and which members hold each file")
    models.add_argument("--json", action="store_true")
    assign = sub.add_parser("assign", help="pin a ROLE shard on a node (the placer keeps it there); reasoning on "
                                           "several nodes: one model split across them",
                            description="Pin a ROLE shard on a node. `assign reasoning --node HEAD --node STAGE "
                                        "[--node STAGE ...]` pins the model split across those members instead: "
                                        "the first holds its first layers and serves it, the others its last ones "
                                        "in that order, each a share of the layers in proportion to its memory "
                                        "(undo with `meshctl split MODEL --clear`).")
    assign.add_argument("role")
    assign.add_argument("--node", required=True, action="append", help="member name or id (repeat to split reasoning)")
    assign.add_argument("--model", default=None, help="model (default: the first in the catalog for the role)")
    unassign = sub.add_parser("unassign", help="remove a pin")
    unassign.add_argument("role")
    unassign.add_argument("--node", required=True)
    replicas = sub.add_parser("replicas", help="set the desired number of replicas of a role")
    replicas.add_argument("role")
    replicas.add_argument("count", type=int)
    split = sub.add_parser("split", help="run MODEL as a pipeline: its first layers on --head, its last ones on "
                                         "each --stage (llama.cpp RPC over the mesh's mutual TLS)")
    split.add_argument("model")
    split.add_argument("--head", help="member that holds the first layers and serves the model")
    split.add_argument("--stage", action="append", default=[], type=_stage_arg, metavar="NAME=LAYERS",
                       help="a member and how many of the model's last layers it holds; repeat, in pipeline order")
    split.add_argument("--clear", action="store_true", help="serve the model whole again")
    drain = sub.add_parser("drain", help="move every shard off a node (it stays a member)")
    drain.add_argument("node")
    remove = sub.add_parser("remove", help="take a node out of the mesh (its shards move elsewhere)")
    remove.add_argument("node")
    remove.add_argument("--force", action="store_true",
                        help="remove the mesh's last authority even when no other member may hold the CA key "
                             "(nothing can rotate the CA, join or renew afterwards)")
    token = sub.add_parser("token", help="join tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_sub.add_parser("create", help="make a join token (printed once)")
    create.add_argument("--ttl", type=float, default=24.0, help="hours the token stays valid (default 24)")
    create.add_argument("--uses", type=int, default=1, help="how many nodes may join with it (default 1)")
    revoke = token_sub.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("token_id")
    keys = sub.add_parser("keys", help="gateway API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kcreate = keys_sub.add_parser("create", help="make an API key (printed once)")
    kcreate.add_argument("--name", default="unnamed", help="what the key is for")
    krevoke = keys_sub.add_parser("revoke", help="revoke a key by its id")
    krevoke.add_argument("key_id")
    klist = keys_sub.add_parser("list", help="the keys (ids and names, never the secrets)")
    klist.add_argument("--json", action="store_true")
    admin = sub.add_parser("admin", help="admin credentials for this API (one per operator; members hold their own)")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    acreate = admin_sub.add_parser("create", help="make an operator's credential (printed once)")
    acreate.add_argument("name", help="who or what it is for")
    arevoke = admin_sub.add_parser("revoke", help="revoke a credential by its id or name")
    arevoke.add_argument("admin", metavar="ID_OR_NAME")
    alist = admin_sub.add_parser("list", help="the credentials (ids, names, owners; never the secrets)")
    alist.add_argument("--json", action="store_true")
    ca = sub.add_parser("ca", help="the mesh CA: rotate it if its key may have leaked")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    crotate = ca_sub.add_parser("rotate", help="make a new CA; every member moves to it and the old one is dropped "
                                               "(meshctl remove does this by itself for a member that held the key)")
    crotate.add_argument("--reason", default="an operator asked", help="recorded in the log and the members' logs")
    ca_sub.add_parser("finish", help="stop waiting for members that are away (remove them and join them "
                                     "again): the old CA is dropped once the others hold certificates from the new one")
    return p


def admin_token(args: argparse.Namespace) -> str | None:
    """--admin-token, $QUORUM_ADMIN_TOKEN, or the admin.token a member keeps in its data dir."""
    if args.admin_token:
        return args.admin_token.strip()
    path = _data_dir(args) / "admin.token"
    try:
        return path.read_text().strip()
    except OSError:  # not on a member's machine: the request goes without, and the mesh says 401
        return None


def _data_dir(args: argparse.Namespace):
    from pathlib import Path

    from mesh.security.datadir import default_data_dir

    return Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()


def tls_target(args: argparse.Namespace) -> tuple[str, ssl.SSLContext | None]:
    """(the mesh address, the TLS context to check it with, None for plain HTTP)."""
    mesh = args.mesh
    if args.ca and "://" not in mesh:
        mesh = f"https://{mesh}"
    if not mesh.startswith("https://"):
        if args.ca:
            raise MeshError(f"--ca was given but --mesh {mesh} is plain HTTP")
        return mesh, None
    ca = args.ca or next((str(p) for p in [_data_dir(args) / "ca.pem"] if p.is_file()), None)
    try:
        return mesh, ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise MeshError(f"--ca {ca}: not a readable PEM certificate ({exc})") from None


def run(args: argparse.Namespace) -> str:
    admin = admin_token(args)
    mesh, context = tls_target(args)

    def call(mesh: str, path: str, body: dict | None = None, **kw: Any) -> Any:
        return _call(mesh, path, body, admin=admin, context=context, **kw)

    if args.command == "status":
        st = call(mesh, "/control/v1/status")
        return json.dumps(st, indent=2) if args.json else render_status(st)
    if args.command == "models":
        models = call(mesh, "/control/v1/models")["models"]
        return json.dumps(models, indent=2) if args.json else render_models(models)
    if args.command == "assign" and len(args.node) > 1:
        if args.role != "reasoning":
            raise MeshError(f"only reasoning runs split across members; {args.role} takes one --node")
        try:
            body, warning = pinned_split(call(mesh, "/control/v1/status"),
                                         call(mesh, "/control/v1/models")["models"], args.node, args.model)
        except ValueError as exc:
            raise MeshError(str(exc)) from None
        r = call(mesh, "/control/v1/split", body)["split"]
        return (f"pinned {r['model']} split: head on {r['head']}, stages "
                + ", ".join(f"{s['node']} ({s['layers']} layers)" for s in r["stages"])
                + (f"\nwarning: {warning}" if warning else ""))
    if args.command == "assign":
        r = call(mesh, "/control/v1/assign", {"role": args.role, "node": args.node[0], "model": args.model})["pinned"]
        return f"pinned {r['role']} ({r['model']}) on {r['node']}"
    if args.command == "unassign":
        r = call(mesh, "/control/v1/unassign", {"role": args.role, "node": args.node})["unpinned"]
        return f"unpinned {r['role']} on {r['node']}"
    if args.command == "replicas":
        call(mesh, "/control/v1/replicas", {"role": args.role, "count": args.count})
        return f"{args.role}: {args.count} replica(s) desired"
    if args.command == "split":
        if args.clear:
            if args.head or args.stage:
                raise MeshError("split --clear takes no --head or --stage")
            return f"{call(mesh, '/control/v1/split', {'model': args.model, 'clear': True})['cleared']}: served whole"
        if not args.head or not args.stage:
            raise MeshError("split needs --head NAME and at least one --stage NAME=LAYERS (or --clear)")
        r = call(mesh, "/control/v1/split", {"model": args.model, "head": args.head, "stages": args.stage})["split"]
        return f"{r['model']}: head on {r['head']}, stages " + ", ".join(f"{s['node']} ({s['layers']} layers)"
                                                                     for s in r["stages"])
    if args.command == "drain":
        return f"draining {call(mesh, '/control/v1/drain', {'node': args.node})['draining']}"
    if args.command == "remove":
        body = {"node": args.node, **({"force": True} if args.force else {})}
        done = call(mesh, "/control/v1/remove", body, timeout=60)
        return f"removed {done['removed']}" + (f"\nwarning: {done['warning']}" if done.get("warning") else "")
    if args.command == "token" and args.token_command == "create":
        return call(mesh, "/control/v1/tokens", {"ttl_s": args.ttl * 3600, "uses": args.uses})["token"]
    if args.command == "token" and args.token_command == "revoke":
        return f"revoked {call(mesh, '/control/v1/tokens/revoke', {'token_id': args.token_id})['revoked']}"
    if args.command == "keys" and args.keys_command == "create":
        return call(mesh, "/control/v1/keys", {"name": args.name})["key"]
    if args.command == "keys" and args.keys_command == "revoke":
        return f"revoked {call(mesh, '/control/v1/keys/revoke', {'key_id': args.key_id})['revoked']}"
    if args.command == "keys" and args.keys_command == "list":
        keys = call(mesh, "/control/v1/keys")["keys"]
        if args.json:
            return json.dumps(keys, indent=2)
        return table(["KEY ID", "NAME", "CREATED", "STATE"],
                     [[k["key_id"], k["name"], time.strftime("%Y-%m-%d %H:%M", time.localtime(k["created_at"])),
                       "revoked" if k["revoked"] else "active"] for k in keys])
    if args.command == "admin":
        return _admin(args, lambda path, body=None: call(mesh, path, body))
    if args.command == "ca" and args.ca_command == "rotate":
        call(mesh, "/control/v1/ca/rotate", {"reason": args.reason})
        return "CA rotation requested: an authority makes a new CA and every member moves to it"
    if args.command == "ca" and args.ca_command == "finish":
        done = call(mesh, "/control/v1/ca/rotate", {"finish": True})
        late = done["left_behind"]
        return ("the old CA is dropped as soon as the members that trust the new one have renewed"
                + (f"; left behind (remove them, then join them again): {', '.join(late)}" if late else ""))
    raise AssertionError(args.command)


def _admin(args: argparse.Namespace, call: Callable[..., Any]) -> str:
    if args.admin_command == "create":
        return call("/control/v1/admins", {"name": args.name})["admin"]
    if args.admin_command == "revoke":
        done = call("/control/v1/admins/revoke", {"admin": args.admin})
        return f"revoked {done['revoked']} ({done['name']})"
    creds = call("/control/v1/admins")["admins"]
    if args.json:
        return json.dumps(creds, indent=2)
    return table(["ID", "NAME", "MEMBER", "CREATED", "STATE"],
                 [[c["id"], c["name"], c["member"] or "-",
                   time.strftime("%Y-%m-%d %H:%M", time.localtime(c["created_at"])),
                   "revoked" if c["revoked"] else "active"] for c in creds])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except MeshError as exc:
        print(f"meshctl: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader (| head) stopped early: nothing left to say
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
