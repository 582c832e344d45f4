"""Fair and bounded, and HTTPS, against real meshd processes (null backend: no weights) on loopback.

- A slow-body flood of the leader's peer port (more connections than the server's whole limit, each
  trickling a join body a byte a second, refused ones coming back) leaves the requests another
  member relays to the leader served: the flood gets a small pool of its own (the rest is refused at
  once) and each connection in it is cut at the whole-request deadline, while members' connections
  are exempt.
- A gateway with `gateway.tls = "mesh"` answers the real `openai` client that trusts the mesh CA
  (ca.pem, as served by GET /control/v1/ca) and meshctl over https, and gives plain HTTP nothing.

Hostile input tried here: 520 TLS connections to the peer port without a certificate, each sending a
join's head and then one byte of its body per second; plain HTTP to an HTTPS gateway.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import threading
import time

import httpx
import openai

from mesh.node.bootstrap import _fetch_ca
from mesh.security.http_guard import MAX_CONNECTIONS
from mesh.security.pki import trusting
from tests.procs import REPO, Meshd, kill_all, start_mesh, wait_until

MODEL = "gemma-3-270m"
FLOOD = MAX_CONNECTIONS + 8  # more than the whole server allows: before item 7 this took the port
JOIN_POOL = 16  # gateway.peer_join_connections, the default
DEADLINE_S = 10  # gateway.request_timeout_s, the default
REOPEN = 3  # a refused flood connection comes back this many times, a second apart


class SlowBodyFlood:
    """FLOOD connections to `address`, each a join whose body comes a byte a second, in a thread of
    its own; records, per connection, what the server did: refused at once, or cut later."""

    def __init__(self, host: str, port: int, ca_pem: bytes) -> None:
        self.host, self.port, self.context = host, port, trusting(ca_pem)
        self.opened = 0
        self.refused_at_once: list[float] = []
        self.cut_after: list[float] = []  # seconds from the head to the server's close
        self.held: list[tuple[float, float]] = []  # (head sent, closed by the server) of each held connection
        self.failed: list[str] = []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> "SlowBodyFlood":
        self.thread.start()
        return self

    async def _run(self) -> None:
        await asyncio.gather(*(self._one() for _ in range(FLOOD)))

    async def _one(self) -> None:
        """One attacker's slot: a connection trickling a join body; refused at once, it comes back a
        second later, REOPEN times (an attacker keeps the port full, as connections free up)."""
        for attempt in range(REOPEN + 1):
            outcome = await self._connect_and_trickle(first=attempt == 0)
            if outcome is None:
                return
            if outcome > 0:
                self.cut_after.append(outcome)
            if outcome > 0 or attempt == REOPEN:
                if outcome == 0:
                    self.refused_at_once.append(outcome)
                return
            await asyncio.sleep(1.0)

    async def _connect_and_trickle(self, first: bool) -> float | None:
        """Seconds from the head to the server's close; 0.0 when refused at once; None if no connection."""
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.context,
                                                           server_hostname="quorum-node")
        except (OSError, ssl.SSLError) as exc:
            self.failed.append(repr(exc))
            self.opened += first
            return None
        writer.write(b"POST /control/v1/join HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 4096\r\n\r\n{")
        self.opened += first
        started = time.monotonic()
        answer = b""
        try:
            for _ in range(60):  # bounded: a byte a second, never 4096 of them
                try:
                    answer = await asyncio.wait_for(reader.read(64), 1.0)
                    break  # an answer or a close
                except asyncio.TimeoutError:
                    writer.write(b" ")
        except (ConnectionError, ssl.SSLError):  # the server closed mid-write: that is the cut we wait for
            answer = b""
        finally:
            writer.close()
        ended = time.monotonic()
        elapsed = ended - started
        if answer.startswith(b"HTTP/1.1 503"):
            # Refused at once (join pool or server full). Told by the answer, not by the time it took to
            # read it: on a loaded machine this client's 520 connections see even a refusal late.
            return 0.0
        self.held.append((started, ended))
        return max(elapsed, 0.001)

    def most_held_at_once(self) -> int:
        """The most connections the server held at one moment, from the client's side. A span ends when this
        client saw the close, which on a loaded machine (this one thread reads 520 connections) can be seconds
        after the server let go and took the next one in; so each span counts up to a second before the
        whole-request deadline, when the server surely still held it (a connection cut earlier or later fails
        the cut_after check instead)."""
        spans = [(s, min(e, s + DEADLINE_S - 1)) for s, e in self.held]
        edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
        most = now = 0
        for _, step in edges:
            now += step
            most = max(most, now)
        return most

    def done(self) -> bool:
        return not self.thread.is_alive()


def test_a_slow_body_flood_of_the_peer_port_leaves_relayed_requests_served(tmp_path):
    nodes = start_mesh(tmp_path, ["a", "b"], ["a"], backend="null")
    try:
        a, b = nodes["a"], nodes["b"]
        assert a.status()["raft"]["is_leader"]
        flood = SlowBodyFlood("127.0.0.1", a.port + 3, (a.data_dir / "ca.pem").read_bytes()).start()
        wait_until(lambda: flood.opened == FLOOD, 30, "the flood's connections to open")
        client = openai.OpenAI(base_url=f"{b.base_url}/v1", api_key="unused", max_retries=0, timeout=15)
        served = []
        while not flood.done() and len(served) < 20:  # bounded: relayed requests while the flood holds on
            served.append(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                         max_tokens=4).choices[0].finish_reason)
            served.append(len(client.models.list().data) > 0)
        wait_until(flood.done, 3 * DEADLINE_S, "the flood to be cut off")
        assert served and all(served), served
        assert not flood.failed, flood.failed[:3]
        # At most the pool at once (a refused connection that comes back once the pool frees may get in).
        assert flood.most_held_at_once() <= JOIN_POOL + 2, flood.held
        assert len(flood.refused_at_once) >= FLOOD - JOIN_POOL * (REOPEN + 1)
        assert all(DEADLINE_S - 1 < t < DEADLINE_S + 5 for t in flood.cut_after), flood.cut_after
    finally:
        kill_all(nodes)


def test_an_https_gateway_answers_clients_that_trust_the_mesh_ca_and_nothing_else(tmp_path):
    node = Meshd(tmp_path / "a", command="start", backend="null")
    node.data_dir.mkdir(parents=True)
    (node.data_dir / "mesh.toml").write_text('[gateway]\ntls = "mesh"\n[discovery]\nadvertise = false\n')
    node.init()
    with node:
        ca_file = node.data_dir / "ca.pem"
        trusted = ssl.create_default_context(cafile=str(ca_file))
        https = f"https://{node.address}"

        def ready() -> bool:
            if node.proc.poll() is not None:
                raise RuntimeError(f"meshd exited with {node.proc.returncode}:\n{node.log()}")
            try:
                return httpx.get(f"{https}/health", verify=trusted, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        wait_until(ready, 60, "the HTTPS gateway")
        # ca.pem is what the gateway hands out at /control/v1/ca (once fetched, check it out of band).
        served_ca = httpx.get(f"{https}/control/v1/ca", verify=trusted, timeout=10).json()["ca"]
        assert served_ca.strip() == ca_file.read_text().strip()

        client = openai.OpenAI(base_url=f"{https}/v1", api_key="unused", max_retries=0, timeout=30,
                               http_client=httpx.Client(verify=trusted))
        wait_until(lambda: MODEL in {m.id for m in client.models.list().data}, 60, "the model to be listed")
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4)
        assert reply.choices[0].finish_reason in ("stop", "length")

        stranger = openai.OpenAI(base_url=f"{https}/v1", api_key="unused", max_retries=0, timeout=10)
        try:
            stranger.models.list()
            raise AssertionError("a client that does not trust the mesh CA was answered")
        except openai.APIConnectionError as exc:
            assert "CERTIFICATE_VERIFY_FAILED" in repr(exc.__cause__)
        try:
            httpx.get(f"{node.base_url}/health", timeout=10)
            raise AssertionError("plain HTTP was answered on the HTTPS port")
        except httpx.HTTPError:
            pass  # refused, as it should be: the port speaks TLS only

        done = subprocess.run([sys.executable, "-m", "mesh.cli.meshctl", "--mesh", https, "--data-dir",
                               str(node.data_dir), "status", "--json"], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert '"members"' in done.stdout

        # A joiner finds the CA on an HTTPS-only gateway too (checked against the token's fingerprint
        # before anything secret is sent).
        async def fetch() -> str:
            async with httpx.AsyncClient(timeout=10) as plain:
                return (await _fetch_ca(plain, node.address)).json()["ca"]
        assert asyncio.run(fetch()).strip() == ca_file.read_text().strip()
