#!/usr/bin/env bash
# Runs every test of the repository: Rust unit, golden and end-to-end tests (the e2e suite
# starts the real `weir` binary against mock upstreams), then the real-client tests (the
# official `openai` and `anthropic` Python packages, Claude Code, Codex CLI and the JS SDKs
# against a running `weir`).
#
#   scripts/test.sh
#
# Needs the Rust toolchain of rust-toolchain.toml, Python 3 with venv and Node.js 20+ with
# npm; everything else (the wasm32-wasip2 target, redis-server from Debian, plugin builds, the
# Python packages, the pinned npm clients) it sets up itself.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

step() { printf '\n==> %s\n' "$*"; }
die() {
  printf '\ntest.sh: %s\n' "$*" >&2
  exit 1
}

command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs)"

step "Rust target wasm32-wasip2"
if command -v rustup >/dev/null; then
  if rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    echo "already installed"
  else
    rustup target add wasm32-wasip2 || die "could not install the wasm32-wasip2 target (rustup target add wasm32-wasip2)"
  fi
else
  echo "rustup not found; assuming the toolchain already has wasm32-wasip2"
fi

step "redis-server (shared-state tests)"
if command -v redis-server >/dev/null || [[ -n "${WEIR_REDIS_SERVER:-}" ]]; then
  redis-server --version 2>/dev/null || echo "WEIR_REDIS_SERVER=$WEIR_REDIS_SERVER"
else
  sudo=""
  if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null || die "redis-server is missing and there is no root or sudo to install it (apt-get install redis-server), or set WEIR_REDIS_SERVER"
    sudo="sudo -n"
  fi
  command -v apt-get >/dev/null || die "redis-server is missing: install Redis 7+ or Valkey, or set WEIR_REDIS_SERVER to its redis-server binary"
  # The package starts a system service on 6379; the tests start their own servers.
  $sudo apt-get install -y -qq redis-server >/dev/null 2>&1 ||
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server; } ||
    die "could not install redis-server (apt-get install redis-server)"
  redis-server --version
fi

if [[ -f scripts/build-plugins.sh ]]; then
  step "Build plugins (scripts/build-plugins.sh)"
  bash scripts/build-plugins.sh || die "scripts/build-plugins.sh failed"
fi

step "cargo build --workspace"
cargo build --workspace --locked || die "cargo build failed"

target_dir="$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')" ||
  die "cannot read the cargo target directory"
export WEIR_BIN="${WEIR_BIN:-$target_dir/debug/weir}"
[[ -x "$WEIR_BIN" ]] || die "the weir binary is missing at $WEIR_BIN after the build"

failed=()

if cargo nextest --version >/dev/null 2>&1; then
  step "cargo nextest run --workspace"
  cargo nextest run --workspace --locked --no-fail-fast || failed+=("Rust tests (cargo nextest)")
  step "cargo test --workspace --doc"
  cargo test --workspace --locked --doc || failed+=("Rust doc tests")
else
  step "cargo test --workspace"
  cargo test --workspace --locked --no-fail-fast || failed+=("Rust tests (cargo test)")
fi

# Plugin crates are their own workspaces (built to WASM by build-plugins.sh); their native
# tests (detector corpus, SDK harness tests) run here with one shared target dir.
for manifest in plugins/*/Cargo.toml examples/*/Cargo.toml; do
  [[ -f "$manifest" ]] || continue
  step "cargo test --manifest-path $manifest"
  cargo test --manifest-path "$manifest" --target-dir "$target_dir/plugin-tests" ||
    failed+=("plugin tests ($manifest)")
done

step "Python real-client tests (tests/python)"
bash scripts/setup-python.sh || die "could not set up the Python environment"
pyenv="${WEIR_PYENV:-$root/target/pyenv}"
set +e
(cd tests/python && "$pyenv/bin/python" -m pytest -q)
code=$?
set -e
case "$code" in
  0) ;;
  5) failed+=("Python tests (pytest collected no tests)") ;;
  *) failed+=("Python tests (pytest exit $code)") ;;
esac

step "Real agents and JS SDKs (scripts/test-agents.sh)"
bash scripts/test-agents.sh || failed+=("agent and JS SDK tests (scripts/test-agents.sh)")

if ((${#failed[@]})); then
  printf '\ntest.sh: FAILED:\n' >&2
  printf '  - %s\n' "${failed[@]}" >&2
  exit 1
fi
printf '\ntest.sh: all tests passed\n'
