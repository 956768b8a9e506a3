#!/usr/bin/env bash
# Builds every Rust plugin crate for wasm32-wasip2 (release) and copies its component to
# `<plugin dir>/plugin.wasm` (git-ignored: WASM is built from source, never committed).
#
#   scripts/build-plugins.sh            # examples/*, plugins/*, tests/fixtures/wasm/*, tests/conformance/*
#   scripts/build-plugins.sh DIR...     # only these plugin folders
#
# A plugin crate is a folder with a Cargo.toml depending on `weir-sdk` (or, for the
# fault fixtures, `wit-bindgen`). Each is its own cargo workspace; all share one target
# dir, target/wasm, so common dependencies compile once.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target_dir="${WEIR_WASM_TARGET_DIR:-$root/target/wasm}"

# RUSTUP_AUTO_INSTALL=0 in CI: make sure the target is there (no-op when it is).
if command -v rustup >/dev/null 2>&1; then
    rustup target add wasm32-wasip2 >/dev/null 2>&1 || true
fi

if [ "$#" -gt 0 ]; then
    dirs=("$@")
else
    dirs=()
    for d in "$root"/examples/*/ "$root"/plugins/*/ "$root"/tests/fixtures/wasm/*/ "$root"/tests/conformance/*/; do
        [ -f "$d/Cargo.toml" ] || continue
        grep -qE '^(weir-sdk|wit-bindgen)' "$d/Cargo.toml" || continue
        dirs+=("${d%/}")
    done
fi

for dir in "${dirs[@]}"; do
    manifest="$dir/Cargo.toml"
    name="$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$manifest" | head -n1)"
    artifact="$target_dir/wasm32-wasip2/release/${name//-/_}.wasm"
    echo "building $name ($dir)" >&2
    cargo build --quiet --release --target wasm32-wasip2 \
        --manifest-path "$manifest" --target-dir "$target_dir"
    # Copy then rename: tests (one process each) may build the same plugin at once while
    # others load it, and a reader must never see a half-written component.
    tmp="$(mktemp "$dir/.plugin.wasm.XXXXXX")"
    cp "$artifact" "$tmp"
    mv -f "$tmp" "$dir/plugin.wasm"
    echo "  -> $dir/plugin.wasm ($(wc -c <"$dir/plugin.wasm") bytes)" >&2
done
