"""Real meshd processes for tests and benchmarks: free loopback ports, readiness by polling
/health (bounded), and every process killed by its pid when done, or by the kernel when the test
process dies first (guarded(): PR_SET_PDEATHSIG; meshd's own shard processes die with it)."""

from __future__ import annotations

import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
MESHD = [sys.executable, "-m", "mesh.cli.meshd"]


def guarded(args: list[str]) -> list[str]:
    """`args` run so that the process gets SIGKILL when this (test) process dies, even by kill -9
    (tests/pdeathsig.py). Wrap every long-lived process a test starts in it."""
    return [sys.executable, "-m", "tests.pdeathsig", str(os.getpid()), *args]


def free_ports(count: int = 4) -> int:
    """A base port such that base .. base+count-1 are all free on 127.0.0.1.

    Drawn below the kernel's ephemeral range: a port from that range can be taken by any outgoing
    connection (a test's HTTP client, a member's Raft or gRPC dial) between this check and meshd's
    bind, which made a member fail to start now and then ("Address already in use")."""
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(10000, max(10001, low - count))
        socks = []
        try:
            for p in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports found")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: the IANA dynamic range starts here
        return 49152


def wait_until(condition, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Meshd:
    """One meshd process. Use as a context manager; it is always killed on exit."""

    def __init__(self, data_dir: Path, *extra: str, backend: str = "llama", threads: int = 1,
                 port: int | None = None, command: str | None = None, name: str | None = None,
                 host: str = "127.0.0.1", listen: str | None = None, advertise: str | None = None,
                 prefix: tuple[str, ...] = (), https: bool = False) -> None:
        """`prefix` runs meshd under another command (e.g. `ip netns exec NS`); `host` is the
        address the test reaches it on; `listen`/`advertise` default to host:port and nothing.
        `https`: the gateway serves HTTPS with a mesh certificate (gateway.tls = "mesh"), as it must
        for the control API to answer beyond loopback; the helpers below then trust the mesh CA."""
        self.data_dir = Path(data_dir)
        self.port = port or free_ports(4)
        self.address = f"{host}:{self.port}"
        self.https = https
        self.base_url = f"{'https' if https else 'http'}://{self.address}"
        if https:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            config = self.data_dir / "mesh.toml"
            if not config.exists():
                config.write_text('[gateway]\ntls = "mesh"\n')
        self.name = name or self.data_dir.name
        self.prefix = list(prefix)
        self.common = ["--data-dir", str(self.data_dir), "--listen", listen or self.address, "--name", self.name,
                       "--threads", str(threads), "--backend", backend, "--no-progress",
                       *(["--advertise", advertise] if advertise else [])]
        self.args = [*self.prefix, *MESHD, *([command] if command else []), *self.common, *extra]
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-meshd.log"

    def start(self) -> "Meshd":
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(guarded(self.args), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        return self

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What an httpx client passes to reach this gateway: the mesh CA over HTTPS (by CA only: the test
        may reach the member on an address its certificate does not name)."""
        if not self.https:
            return True
        ca = self.data_dir / "ca.pem"
        context = ssl.create_default_context(cafile=str(ca)) if ca.exists() else ssl.create_default_context()
        context.check_hostname = False
        return context

    def health(self) -> int:
        try:
            return httpx.get(f"{self.base_url}/health", timeout=2, verify=self.verify).status_code
        except (httpx.HTTPError, ssl.SSLError):
            return 0

    def wait_ready(self, timeout: float = 120) -> "Meshd":
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"meshd exited with {self.proc.returncode}:\n{self.log()}")
            return self.health() == 200
        wait_until(ready, timeout, f"meshd on {self.address} to be ready")
        return self

    def init(self) -> str:
        """Runs `meshd init` for this node (not the daemon); returns its output."""
        done = subprocess.run([*self.prefix, *MESHD, "init", *self.common], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"meshd init failed: {done.stderr}")
        return done.stdout

    def admin_headers(self) -> dict[str, str]:
        """The admin credential meshd keeps in the data dir (control API calls need it)."""
        path = self.data_dir / "admin.token"
        return {"Authorization": f"Bearer {path.read_text().strip()}"} if path.exists() else {}

    def post(self, path: str, body: dict | None = None, timeout: float = 60) -> httpx.Response:
        return httpx.post(f"{self.base_url}{path}", json=body or {}, timeout=timeout, headers=self.admin_headers(),
                          verify=self.verify)

    def get_json(self, path: str) -> dict:
        reply = httpx.get(f"{self.base_url}{path}", timeout=10, headers=self.admin_headers(), verify=self.verify)
        reply.raise_for_status()
        return reply.json()

    def status(self) -> dict:
        return httpx.get(f"{self.base_url}/control/v1/status", timeout=5, headers=self.admin_headers(),
                         verify=self.verify).json()

    def meshctl(self, *args: str) -> str:
        """`meshctl ARGS` against this node with its admin credential; its output (fails on an error)."""
        done = subprocess.run([sys.executable, "-m", "mesh.cli.meshctl", "--mesh", self.address, "--data-dir",
                               str(self.data_dir), *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"meshctl {' '.join(args)} failed: {done.stderr}")
        return done.stdout

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def interrupt(self, timeout: float = 30) -> int:
        """Ctrl-C, then wait for a clean exit; returns the exit code."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def __enter__(self) -> "Meshd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


def join_token(node: Meshd, ttl_s: int = 3600) -> str:
    reply = node.post("/control/v1/tokens", {"ttl_s": ttl_s})
    reply.raise_for_status()
    return reply.json()["token"]


def ready_replicas(node: Meshd) -> list[str]:
    """Names of the members holding a ready reasoning shard, as `node` sees it ([] while it is starting)."""
    try:
        st = node.status()
    except httpx.HTTPError:
        return []
    names = {m["node_id"]: m["name"] for m in st["members"]}
    return sorted(names[s["node_id"]] for s in st["shards"] if s["state"] == "ready" and s["role"] == "reasoning")


def start_mesh(root: Path, names: list[str], replicas_on: list[str], **kw) -> dict[str, Meshd]:
    """A mesh of `names` (the first creates it, the others join through it) with a pinned
    reasoning replica on each of `replicas_on`. The caller kills the processes (kill_all)."""
    first = Meshd(root / names[0], command="start", **kw)
    first.init()
    nodes = {names[0]: first}
    try:
        first.start().wait_ready()
        for name in names[1:]:
            nodes[name] = Meshd(root / name, "--peer", first.address, "--token", join_token(first),
                                command="join", **kw).start()
            wait_until(lambda n=nodes[name]: n.health() == 200, 120, f"{name} to join")
        first.post("/control/v1/replicas", {"role": "reasoning", "count": len(replicas_on)}).raise_for_status()
        for name in replicas_on:
            first.post("/control/v1/assign", {"role": "reasoning", "node": name}).raise_for_status()
        wait_until(lambda: ready_replicas(first) == sorted(replicas_on), 180, f"replicas on {replicas_on}")
    except BaseException:
        kill_all(nodes)
        raise
    return nodes


def serves(node: Meshd) -> bool:
    """True once the node has loaded a reasoning shard itself (the log may still say "ready" from before a restart).
    Raises if its process has exited (a wait on it would otherwise run out its whole timeout)."""
    if node.proc is not None and node.proc.poll() is not None:
        raise RuntimeError(f"meshd {node.name} exited with {node.proc.returncode}:\n{node.log()[-3000:]}")
    try:
        return any(s["role"] == "reasoning" and s["state"] == "ready" for s in node.status()["local_shards"])
    except httpx.HTTPError:
        return False


def kill_all(nodes: dict[str, Meshd]) -> None:
    for node in nodes.values():
        node.kill()


def stream_chat(client, model: str, messages: list[dict], max_tokens: int, interrupt=None,
                at: int = 12) -> tuple[str, list[str]]:
    """A greedy chat stream through the openai SDK: its text and its finish reasons. `interrupt()`
    runs after chunk `at` (a replica killed mid-stream, in the failover tests)."""
    text, finishes = "", []
    chunks = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True)
    for i, chunk in enumerate(chunks):
        text += chunk.choices[0].delta.content or ""
        finishes.append(chunk.choices[0].finish_reason)
        if i == at and interrupt is not None:
            interrupt()
    return text, [f for f in finishes if f]
