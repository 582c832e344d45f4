"""LAN discovery: members announce themselves by mDNS/DNS-SD, and `meshd join --discover` finds one.

Every running member (unless `[discovery] advertise = false`) registers one instance of the service
type `discovery.service` (default `_quorum._tcp.local.`): its SRV record gives the HTTP port, its
A records the address(es) members reach it on, and its TXT record

    v=1          the format of this record
    mesh=<id>    the mesh id: public, it names the mesh and grants nothing
    http=<port>  the HTTP port (gateway, control API, joins)
    name=<node>  the member's name, for people reading a browser's output

Nothing secret is advertised: a joiner still needs a join token, which the member checks.

mDNS is spoken on the interface of the node's listen address (a node on 127.0.0.1 is only seen on
this machine), or on every interface when it listens on 0.0.0.0. IPv4 only.

zeroconf is imported only when advertising or browsing starts, so importing this module costs
nothing: a witness on a router pays for zeroconf (about 10 MB) only if it advertises.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from mesh.core.config import MeshConfig, NodeConfig

log = logging.getLogger("quorum.discovery")

TXT_VERSION = "1"
SETTLE_S = 1.0  # after the first matching member answers, wait this long for the others' answers
RESOLVE_TIMEOUT_S = 3.0
CLOSE_TIMEOUT_S = 3.0
_WILDCARDS = ("", "0.0.0.0", "::")
_MESH_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_LABEL_CHARS = re.compile(r"[^A-Za-z0-9-]+")

T = TypeVar("T")


class DiscoveryError(RuntimeError):
    """Browsing the LAN failed (no multicast, no usable interface); the message says why."""


@dataclass(frozen=True)
class Advert:
    """What a member's TXT record says about it."""
    mesh_id: str
    http_port: int
    name: str = ""
    ca: str = ""  # the mesh CA's fingerprint (public), as join tokens carry it


@dataclass(frozen=True)
class Candidate:
    """One address of one advertised member, to try joining through."""
    mesh_id: str
    instance: str  # the DNS-SD instance name (unique on the LAN)
    host: str
    port: int
    name: str = ""
    ca: str = ""

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def encode_txt(advert: Advert) -> dict[str, str]:
    return {"v": TXT_VERSION, "mesh": advert.mesh_id, "http": str(advert.http_port), "name": advert.name,
            "ca": advert.ca}


def parse_txt(properties: Mapping[bytes | str, bytes | str | None]) -> Advert | None:
    """The advert in a TXT record, or None if it is not one this version understands."""
    txt = {_text(k): _text(v) for k, v in properties.items()}
    mesh_id, port = txt.get("mesh") or "", txt.get("http") or ""
    if txt.get("v") != TXT_VERSION or not _MESH_ID.fullmatch(mesh_id):
        return None
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return Advert(mesh_id=mesh_id, http_port=int(port), name=txt.get("name") or "", ca=txt.get("ca") or "")


def order_candidates(candidates: Iterable[Candidate], mesh_id: str | None = None,
                     ca: str | None = None) -> list[Candidate]:
    """The candidates to try, in a stable order: only `mesh_id`'s members when it is given, only members
    advertising the CA fingerprint `ca` when that is given (a join token's); grouped by mesh, then by
    instance name, IPv4 before IPv6; each address once. (An advert is not proof: the join itself checks
    the member's CA certificate against the token before sending anything.)"""
    def key(c: Candidate) -> tuple:
        ip = ipaddress.ip_address(c.host)
        return c.mesh_id, c.instance.lower(), c.instance, ip.version, int(ip), c.port

    usable = [c for c in candidates if _is_ip(c.host) and (mesh_id is None or c.mesh_id == mesh_id)
              and (ca is None or c.ca == ca)]
    seen: set[str] = set()
    ordered = []
    for c in sorted(usable, key=key):
        if c.address not in seen:
            seen.add(c.address)
            ordered.append(c)
    return ordered


def instance_label(name: str, node_id: str) -> str:
    """A DNS-SD instance label for a member (at most 63 bytes), unique by its node id."""
    safe = _LABEL_CHARS.sub("-", name).strip("-")[:40] or "node"
    return f"{safe}-{node_id[:12]}"


def interfaces_for(host: str) -> list[str] | None:
    """The IPv4 addresses of the interfaces to speak mDNS on for a node listening on `host`;
    None for every interface (a wildcard listen, or a name that does not resolve to one address)."""
    if host in _WILDCARDS:
        return None
    addresses = _ipv4_of(host)
    return addresses if len(addresses) == 1 else None


def advertised_addresses(node: NodeConfig) -> list[str]:
    """IPv4 addresses to put in this member's A records: the --advertise host, else the listen host,
    else (listening on 0.0.0.0) every interface's address but loopback."""
    host = node.advertise or node.host
    if host not in _WILDCARDS:
        return _ipv4_of(host)
    import ifaddr  # a dependency of zeroconf

    found = sorted({ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if ip.is_IPv4},
                   key=lambda a: int(ipaddress.ip_address(a)))
    outside = [a for a in found if not ipaddress.ip_address(a).is_loopback]
    return outside or found


async def advertise(cfg: MeshConfig, mesh_id: str, node_id: str, name: str,
                    ca: Callable[[], str] = lambda: "", changed: asyncio.Event | None = None) -> None:
    """Announces this member on the LAN until cancelled, then says goodbye. `ca` gives the fingerprint of the
    CA that signs now (join tokens carry it); each time `changed` is set (this member's identity changed: a
    renewal, a CA rotation) the advertisement is updated when it differs, so `meshd join --discover` with a
    token made after a rotation still finds this member.

    Discovery is a convenience: nothing that goes wrong here (no multicast, no interface, a name
    clash) stops the node. It logs one line and returns; joins through --peer work as before.
    """
    node, service = cfg.node, cfg.discovery.service
    azc = None
    try:
        try:
            from zeroconf.asyncio import AsyncServiceInfo

            addresses = await asyncio.to_thread(advertised_addresses, node)
            if not addresses:
                raise DiscoveryError(f"{node.advertise or node.host} has no IPv4 address to advertise")
            azc = await _zeroconf(node.host)
            label = instance_label(name, node_id)
            advertised = ca()

            def service_info(fingerprint: str, instance: str) -> AsyncServiceInfo:
                return AsyncServiceInfo(service, instance, port=node.port,
                                        server=f"quorum-{node_id[:12]}.local.",
                                        properties=encode_txt(Advert(mesh_id, node.port, name, fingerprint)),
                                        parsed_addresses=addresses)
            info = service_info(advertised, f"{label}.{service}")
            await (await azc.async_register_service(info, allow_name_change=True))
        except Exception as exc:  # noqa: BLE001 -- see the docstring: discovery must never take the node down
            log.warning("not advertised on the LAN (%s: %s); members can still join with --peer",
                        type(exc).__name__, exc)
            return
        log.info("advertised on the LAN as %r (%s) at %s", info.name, service, ", ".join(addresses))
        changed = changed or asyncio.Event()  # never set: advertise as is until the daemon cancels this task
        while True:
            await changed.wait()
            changed.clear()
            if ca() == advertised:
                continue
            advertised = ca()
            info = service_info(advertised, info.name)  # the name zeroconf settled on (allow_name_change)
            try:
                await (await azc.async_update_service(info))
            except Exception as exc:  # noqa: BLE001 -- as above: discovery never takes the node down
                log.warning("could not update the LAN advertisement (%s: %s)", type(exc).__name__, exc)
                continue
            log.info("LAN advertisement updated: the mesh CA changed")
    finally:
        if azc is not None:
            await _close(azc)


async def browse(service: str, host: str, timeout: float, mesh_id: str | None = None,
                 settle: float = SETTLE_S, ca: str | None = None) -> list[Candidate]:
    """Members advertised on the LAN, ordered by order_candidates. Browses for at most `timeout`
    seconds; once a matching member has answered, waits only `settle` seconds more for the rest.
    `host` is the listen host of the node that browses (it picks the interfaces)."""
    try:
        from zeroconf import IPVersion, ServiceStateChange
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo

        azc = await _zeroconf(host)
    except OSError as exc:
        raise DiscoveryError(f"cannot use mDNS here: {exc}") from None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    names: asyncio.Queue[tuple[str, bool]] = asyncio.Queue()  # (instance, still there)

    def changed(zeroconf, service_type: str, name: str, state_change) -> None:  # on the event loop
        names.put_nowait((name, state_change is not ServiceStateChange.Removed))

    found: dict[tuple[str, str], Candidate] = {}
    try:
        browser = AsyncServiceBrowser(azc.zeroconf, service, handlers=[changed])
        try:
            while (left := deadline - loop.time()) > 0:
                change = await _within(names.get(), left)
                if change is None:
                    break
                name, present = change
                for key in [key for key in found if key[0] == name]:
                    del found[key]  # gone (a goodbye), or about to be read again (an update)
                if not present:
                    continue
                info = AsyncServiceInfo(service, name)
                if not await info.async_request(azc.zeroconf, 1000 * min(left, RESOLVE_TIMEOUT_S)):
                    continue
                advert = parse_txt(info.properties)
                if advert is None:
                    log.debug("ignoring %s: not a Quorum v%s advert", name, TXT_VERSION)
                    continue
                for ip in info.parsed_addresses(IPVersion.V4Only):
                    found[(name, ip)] = Candidate(advert.mesh_id, name.removesuffix("." + service), ip,
                                                  advert.http_port, advert.name, advert.ca)
                if order_candidates(found.values(), mesh_id, ca):
                    deadline = min(deadline, loop.time() + settle)
        finally:
            await browser.async_cancel()
    finally:
        await _close(azc)
    return order_candidates(found.values(), mesh_id, ca)


async def join_first(candidates: list[Candidate], join: Callable[[str], Awaitable[T]],
                     refused: type[Exception]) -> T:
    """Tries `join(address)` on each candidate in order until one accepts; `refused` is the error a
    refusing or unreachable member raises. Raises `refused` naming every attempt if none accepts."""
    failures = []
    for c in candidates:
        log.info("joining through %s (%s, mesh %s), found on the LAN", c.address, c.name or c.instance,
                 c.mesh_id[:12])
        try:
            return await join(c.address)
        except refused as exc:
            log.warning("%s", exc)
            failures.append(f"{c.address}: {exc}")
    raise refused("no member found on the LAN accepted the join:\n  " + "\n  ".join(failures))


async def _zeroconf(host: str):
    from zeroconf import InterfaceChoice, IPVersion
    from zeroconf.asyncio import AsyncZeroconf

    interfaces = await asyncio.to_thread(interfaces_for, host)
    # zeroconf logs its own error before raising when it cannot open its sockets; the caller says
    # it once, in one line, so zeroconf's logger is quiet while they open.
    quiet = logging.getLogger("zeroconf")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return AsyncZeroconf(interfaces=InterfaceChoice.All if interfaces is None else interfaces,
                             ip_version=IPVersion.V4Only)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, "UDP port 5353 is held by another program that does not share it "
                                     "(an mDNS responder such as avahi with disallow-other-stacks?)") from None
        raise
    finally:
        quiet.setLevel(level)


async def _close(azc) -> None:
    """Unregisters (goodbye packets, so browsers forget this member at once) and closes, bounded."""
    try:
        await asyncio.wait_for(azc.async_close(), CLOSE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 -- the node is stopping anyway; the records expire on their own
        log.info("mDNS did not close cleanly (%s: %s)", type(exc).__name__, exc)


async def _within(aw: Awaitable[T], timeout: float) -> T | None:
    try:
        return await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        return None


def _ipv4_of(host: str) -> list[str]:
    if _is_ip(host):
        return [host] if ipaddress.ip_address(host).version == 4 else []
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return sorted({info[4][0] for info in infos}, key=lambda a: int(ipaddress.ip_address(a)))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value or ""
