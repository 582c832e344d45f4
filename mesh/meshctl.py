"""meshctl: the operator's tool. Talks to the control API of any member."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

DEFAULT_MESH = "127.0.0.1:8080"


class MeshUnreachable(RuntimeError):
    pass


def fetch(mesh: str, path: str, timeout: float = 5.0) -> Any:
    url = f"http://{mesh}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise MeshUnreachable(f"{url}: HTTP {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MeshUnreachable(f"cannot reach the mesh at {mesh} ({reason}); is meshd running? "
                              f"(--mesh HOST:PORT or MESH_ADDR)") from None


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _gib(n: int | None) -> str:
    return "?" if not n else f"{n / (1 << 30):.1f} GiB"


def render_status(st: dict) -> str:
    raft = st["raft"]
    leader = raft.get("leader")
    out = [f"mesh {st['mesh']['name'] or '?'} ({st['mesh']['id'][:12] or 'not initialised'})  "
           f"term {raft.get('term')}  commit {raft.get('commit_index')}  "
           f"health: {st['health']['detail']}", ""]
    members = []
    for m in st["members"]:
        p = m.get("profile", {})
        is_leader = "*" if leader and leader == m["raft_address"] else ""
        members.append([m["name"] + is_leader, m["http_address"], p.get("device_class", "?"),
                        _gib(p.get("ram_total")), p.get("cores", "?"), m["state"]])
    out.append(table(["MEMBER", "ADDRESS", "CLASS", "RAM", "CORES", "STATE"], members))
    out.append("")
    names = {m["node_id"]: m["name"] for m in st["members"]}
    shards = [[s["role"], s["model"], names.get(s["node_id"], s["node_id"]), s["state"], s["detail"]]
              for s in st["shards"]]
    out.append(table(["ROLE", "MODEL", "NODE", "STATE", "DETAIL"], shards))
    out.append("\n* leader")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshctl", description="Inspect and steer a Quorum mesh through any member.")
    p.add_argument("--mesh", default=os.environ.get("MESH_ADDR", DEFAULT_MESH),
                   help=f"HOST:PORT of any member (default: $MESH_ADDR or {DEFAULT_MESH})")
    sub = p.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="members, shards and health of the mesh")
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "status":
            st = fetch(args.mesh, "/control/v1/status")
            print(json.dumps(st, indent=2) if args.json else render_status(st))
    except MeshUnreachable as exc:
        print(f"meshctl: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
