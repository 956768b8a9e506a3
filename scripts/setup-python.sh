#!/usr/bin/env bash
# Creates (or updates) the virtualenv for the real-client tests in tests/python:
#   scripts/setup-python.sh            # -> target/pyenv
#   WEIR_PYENV=/some/dir scripts/setup-python.sh
# Installs the pinned packages of tests/python/requirements.txt from PyPI. Re-running is cheap:
# pip runs only when requirements.txt changed since the last install.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${WEIR_PYENV:-$root/target/pyenv}"
requirements="$root/tests/python/requirements.txt"
python="${PYTHON:-python3}"

die() {
  printf 'setup-python: %s\n' "$*" >&2
  exit 1
}

command -v "$python" >/dev/null || die "$python not found: install Python 3.9+ (Debian: apt-get install python3 python3-venv)"

if [[ ! -x "$venv/bin/python" ]]; then
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv" ||
    die "'$python -m venv' failed: install the venv module (Debian: apt-get install python3-venv)"
fi

stamp="$venv/.requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [[ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]]; then
  "$venv/bin/python" -m pip install --disable-pip-version-check --quiet --upgrade pip >/dev/null ||
    die "could not upgrade pip in $venv"
  "$venv/bin/python" -m pip install --disable-pip-version-check --quiet -r "$requirements" ||
    die "pip could not install $requirements"
  printf '%s\n' "$want" >"$stamp"
fi
printf 'setup-python: %s ready (%s)\n' "$venv" "$("$venv/bin/python" -m pip freeze | grep -iE '^(openai|anthropic|pytest)==' | tr '\n' ' ')"
