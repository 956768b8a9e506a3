#!/usr/bin/env bash
# Real coding agents and JS SDKs against a real `weir` (tests/agents, see docs/testing.md):
# Claude Code, Codex CLI, the `openai` node SDK and the Vercel AI SDK, at the exact versions
# pinned in tests/agents/package-lock.json.
#
#   scripts/test-agents.sh            # every client
#   scripts/test-agents.sh codex      # only tests/agents/codex.test.mjs (any name substring)
#
# Installs the clients with `npm ci` into tests/agents/node_modules (skipped when the lockfile
# is unchanged since the last install), then runs each test file with node's built-in test
# runner inside a fresh network namespace that has only loopback, so no agent can reach the
# internet. Where `unshare -n` is not permitted it falls back to HTTP(S)_PROXY set to a closed
# local port and says so. The binary under test is $WEIR_BIN (default target/debug/weir).
# Exits non-zero if any test file fails, naming each one.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$root/tests/agents"
cd "$dir"

die() {
  printf '\ntest-agents.sh: %s\n' "$*" >&2
  exit 1
}

command -v node >/dev/null || die "node not found: install Node.js 20+ (apt-get install nodejs npm)"
command -v npm >/dev/null || die "npm not found (apt-get install npm)"
major="$(node -p 'process.versions.node.split(".")[0]')"
((major >= 20)) || die "Node.js $major is too old: the tests need node:test from Node 20+"

export WEIR_BIN="${WEIR_BIN:-$root/target/debug/weir}"
[[ -x "$WEIR_BIN" ]] || die "the weir binary is missing at $WEIR_BIN: run cargo build -p weir or set WEIR_BIN"

stamp="node_modules/.weir-installed-lock.json"
if [[ -f "$stamp" ]] && cmp -s package-lock.json "$stamp"; then
  echo "tests/agents: node_modules matches package-lock.json"
else
  echo "tests/agents: npm ci"
  npm ci --no-audit --no-fund --loglevel=error || die "npm ci failed in tests/agents"
  cp package-lock.json "$stamp"
fi

isolate=()
if unshare -n true 2>/dev/null && command -v ip >/dev/null; then
  isolate=(unshare -n)
  echo "tests/agents: running in a loopback-only network namespace (unshare -n)"
else
  echo "tests/agents: WARNING: cannot create a network namespace (unshare -n needs root or" \
    "user namespaces, and ip from iproute2); the agents get HTTP(S)_PROXY=127.0.0.1:9" \
    "(closed) instead, which blocks their HTTP clients but is not a network cut-off"
fi

files=()
for f in *.test.mjs; do
  if (($# == 0)); then
    files+=("$f")
  else
    for want in "$@"; do [[ "$f" == *"$want"* ]] && files+=("$f") && break; done
  fi
done
((${#files[@]})) || die "no test file in tests/agents matches: $*"

failed=()
for f in "${files[@]}"; do
  printf '\n==> tests/agents/%s\n' "$f"
  set +e
  if ((${#isolate[@]})); then
    "${isolate[@]}" sh -c 'ip link set lo up && WEIR_AGENTS_NETNS=1 exec node --test "$0"' "$f"
  else
    node --test "$f"
  fi
  code=$?
  set -e
  ((code == 0)) || failed+=("tests/agents/$f (node --test exit $code)")
done

if ((${#failed[@]})); then
  printf '\ntest-agents.sh: FAILED:\n' >&2
  printf '  - %s\n' "${failed[@]}" >&2
  exit 1
fi
printf '\ntest-agents.sh: all agent and SDK tests passed\n'
