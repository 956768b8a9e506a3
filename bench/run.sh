#!/usr/bin/env bash
# Weir's benchmark suite, one command:
#
#   bench/run.sh                 # everything: build, criterion micro-benchmarks, side by side
#   bench/run.sh --quick         # 2 s runs, 200 slow streams, 50 reloads, short criterion runs
#   bench/run.sh --no-micro      # skip criterion
#   bench/run.sh -- --duration 10   # anything after -- goes to the suite (see `suite --help`)
#   bench/run.sh --no-micro -- --only reload   # only the hot-reload scenarios
#   bench/run.sh --no-micro -- --only redis    # only the default chain on sled vs on Redis
#
# Environment: WEIR_BIN=path uses a prebuilt weir binary instead of building one.
#
# It installs wrk, nginx and redis-server from Debian if they are missing, builds `weir`, the
# bench binaries (release) and the first-party WASM plugins, runs the criterion benches pinned
# to CPU 1, then the suite (mock + load generator on CPU 0, proxy on CPU 1): side by side, then
# RSS over 100 hot reloads, six-plugin reload latency, and the default chain with its state on
# sled, then on Redis (a redis-server it starts on CPU 0). It writes the tables into
# BENCHMARKS.md. Loopback only; every process it starts is stopped on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
COMMAND="bench/run.sh${*:+ $*}"
MICRO=1
QUICK=0
SUITE_ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --no-micro) MICRO=0 ;;
        --) shift; SUITE_ARGS+=("$@"); break ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then SUDO=sudo; fi
missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
[[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "installing ${missing[*]} from Debian" >&2
    $SUDO apt-get install -y --no-install-recommends "${missing[@]}" \
        || { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends "${missing[@]}"; }
fi

# 1,000 streams through a proxy need ~3 descriptors each across the processes.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [[ "$(ulimit -n)" != unlimited && "$(ulimit -n)" -lt 8192 ]]; then
    echo "warning: open-file limit $(ulimit -n) may be too low for 1,000 streams" >&2
fi

OUT="$ROOT/target/weir-bench"
BIN="$OUT/bin"
mkdir -p "$BIN"
echo "building (release) ..." >&2
nice cargo build --release -p weir-bench --bins
cp target/release/mock-upstream target/release/load target/release/suite "$BIN/"
if [[ -n "${WEIR_BIN:-}" ]]; then
    [[ "$WEIR_BIN" -ef "$BIN/weir" ]] || cp "$WEIR_BIN" "$BIN/weir"
else
    nice cargo build --release -p weir
    cp target/release/weir "$BIN/weir"
fi
# plugin.wasm is built from source, never committed. Without it the chain rows and the
# six-plugin reload are reported as not measured.
for dir in plugins/*/; do
    [[ -f "$dir/Cargo.toml" ]] || continue
    nice scripts/build-plugins.sh "${dir%/}" \
        || echo "warning: could not build ${dir%/}/plugin.wasm" >&2
done

if [[ $MICRO -eq 1 ]]; then
    echo "criterion micro-benchmarks (pinned to CPU 1) ..." >&2
    nice cargo bench -p weir-bench --bench hot_path --no-run
    CRIT=()
    if [[ $QUICK -eq 1 ]]; then CRIT=(--warm-up-time 1 --measurement-time 2); fi
    taskset -c 1 cargo bench -p weir-bench --bench hot_path -- "${CRIT[@]}"
fi

if [[ $QUICK -eq 1 ]]; then
    SUITE_ARGS=(--duration 2 --warmup 0.5 --slow-streams 200 --reloads 50 --reload-writes 8
        --state-duration 3 "${SUITE_ARGS[@]}")
fi

# Other work on a shared machine steals the pinned CPUs; as root, run above it.
PRIO=()
NOTE="Run at normal priority."
if [[ "$(id -u)" -eq 0 ]]; then
    PRIO=(nice -n -10)
    NOTE="Run at nice -10 so other work on this shared machine yields to the benchmark."
fi

SUITE_PID=""
cleanup() {
    if [[ -n "$SUITE_PID" ]] && kill -0 "$SUITE_PID" 2>/dev/null; then
        # The suite leads its own process group: this stops it and everything it started.
        kill -TERM -- "-$SUITE_PID" 2>/dev/null || true
        sleep 0.5
        kill -KILL -- "-$SUITE_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT INT TERM

setsid "${PRIO[@]}" "$BIN/suite" \
    --weir "$BIN/weir" \
    --bin-dir "$BIN" \
    --chain-config bench/configs/default-chain.toml \
    --six-plugins-config bench/configs/six-plugins.toml \
    --wasm-cache "$OUT/wasm-cache" \
    --plugins-dir plugins \
    --out BENCHMARKS.md \
    --json "$OUT/results.json" \
    --criterion target/criterion \
    --command "$COMMAND" \
    --note "$NOTE" \
    "${SUITE_ARGS[@]}" &
SUITE_PID=$!
wait "$SUITE_PID"
