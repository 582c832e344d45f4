#!/usr/bin/env bash
# Sets up a Quorum model node on an Android phone under Termux (from F-Droid or GitHub; the Play
# Store build is outdated). Run it from a checkout of the repository:
#
#   pkg install git && git clone <this repo> ~/quorum && bash ~/quorum/deploy/termux/setup.sh
#
# It installs build tools and the Python modules Termux ships prebuilt (numpy, cryptography,
# psutil, grpcio, onnxruntime, tokenizers: building those with pip on a phone fails or takes
# hours), creates .venv with access to them, builds llama-cpp-python for this phone through
# scripts/ensure-venv, and installs the boot and service scripts. It does not join a mesh: the
# last lines say how. The llama.cpp build took ~8 minutes and ~680 MB of RAM on a 2-core x86 VM;
# on a phone with one compile job expect several times longer (not measured): keep it plugged in.
# pyproject.toml pins grpcio; if Termux's python-grpcio is another version, pip compiles grpcio
# too, which takes hours on a phone.
#
# Status: checked with shellcheck and `bash -n` (tests/unit/test_deploy.py), not yet run on a phone.
#
# Environment: QUORUM_EXTRAS (default "full"; "" for a witness-only install), MESH_DATA_DIR
# (default ~/.local/share/quorum), QUORUM_CMAKE_ARGS (replaces the llama.cpp build flags below).
set -euo pipefail

PREFIX="${PREFIX:-/data/data/com.termux/files/usr}"
if [ -z "${TERMUX_VERSION:-}" ] && [ ! -d /data/data/com.termux ]; then
  echo "setup.sh: this is not Termux; see deploy/README.md for other platforms" >&2
  exit 1
fi
repo="$(cd "$(dirname "$0")/../.." && pwd)"
extras="${QUORUM_EXTRAS-full}"
data_dir="${MESH_DATA_DIR:-$HOME/.local/share/quorum}"

echo "== Termux packages" >&2
pkg upgrade -y
pkg install -y python python-pip clang cmake ninja make git binutils libffi openssl \
  termux-services termux-api
# Prebuilt Python modules: with a --system-site-packages venv pip uses them when their version
# satisfies pyproject.toml, instead of compiling (cryptography and tokenizers need Rust, grpcio
# takes hours, psutil no longer builds on Android's Python).
pkg install -y python-cryptography python-psutil
if [ -n "$extras" ]; then
  pkg install -y python-numpy python-grpcio python-onnxruntime
  # tokenizers comes from the Termux User Repository.
  if ! { pkg install -y tur-repo && pkg install -y python-tokenizers; }; then
    echo "setup.sh: no prebuilt python-tokenizers; pip will build it (needs: pkg install rust)" >&2
  fi
fi

echo "== Python environment in $repo/.venv" >&2
cd "$repo"
if [ ! -x .venv/bin/python ]; then
  python -m venv --system-site-packages .venv
fi

# llama.cpp build flags. GGML_NATIVE=OFF with an explicit ARM level, rather than -mcpu=native:
# native detection on phones has produced binaries that die with SIGILL (llama.cpp #3622), and an
# explicit level says what the build needs. dotprod (asimddp) enables ggml's faster quantized
# kernels; every Cortex-A55/A75 or newer has it. OpenMP off: ggml's own thread pool works, and a build
# linked to clang's libomp.so fails to load on Termux ("library libomp.so not found").
cmake_args="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF"
if [ "$(uname -m)" = aarch64 ] && grep -qw asimddp /proc/cpuinfo 2>/dev/null; then
  cmake_args="$cmake_args -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod"
fi
export CMAKE_ARGS="${QUORUM_CMAKE_ARGS:-$cmake_args}"
# pip otherwise calls the target-triplet clang, which misses Android API level defines.
export CC=clang CXX=clang++
# One compile job: the phone's RAM, not its cores, limits the build.
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-1}"
if [ -n "$extras" ]; then
  echo "llama.cpp build flags: $CMAKE_ARGS" >&2
  scripts/ensure-venv "$extras"
else
  .venv/bin/python -m pip install -e .  # the base install: what a witness needs, nothing to compile
fi

echo "== Service scripts" >&2
mkdir -p "$HOME/.config/quorum" "$HOME/.termux/boot" "$PREFIX/var/service/meshd/log"
env_file="$HOME/.config/quorum/meshd.env"
if [ ! -e "$env_file" ]; then
  printf 'QUORUM_HOME=%s\nMESH_DATA_DIR=%s\n' "$repo" "$data_dir" > "$env_file"
fi
install -m 0755 deploy/termux/sv/meshd/run "$PREFIX/var/service/meshd/run"
ln -sf "$PREFIX/share/termux-services/svlogger" "$PREFIX/var/service/meshd/log/run"
# termux-services starts every service unless it has a `down` file: keep meshd down until joined.
[ -e "$data_dir/node.pem" ] || touch "$PREFIX/var/service/meshd/down"
install -m 0755 deploy/termux/boot/start-meshd "$HOME/.termux/boot/start-meshd"

cat <<EOF

Done. Next, once:
  1. Install the Termux:Boot and Termux:API apps (same source as Termux), open Termux:Boot once,
     and exempt Termux from battery optimisation in Android's settings.
  2. Join the mesh (any member's address; a token from \`meshctl token create\` on a member):
       $repo/.venv/bin/meshd join --peer 192.168.1.10:8080 --token TOKEN --data-dir $data_dir \\
         --listen 0.0.0.0:8080 --advertise PHONE_IP --name phone
     It keeps running after it joins; stop it with Ctrl-C once it logs "joined mesh".
  3. Close and reopen Termux (that starts termux-services), then run it as a service, restarted
     if it dies and started at boot by Termux:Boot:
       sv-enable meshd          # logs: $PREFIX/var/log/sv/meshd/current
EOF
