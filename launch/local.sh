#!/usr/bin/env bash
# Run cimd_jax on this machine. Creates (or reuses) a virtual environment with the
# pinned requirements, then runs one of:
#
#   bash launch/local.sh demo [flags]      the main job: synthetic data -> train -> evaluate -> report
#   bash launch/local.sh test [pytest args] the test suite (slow end-to-end tests included)
#   bash launch/local.sh main [flags]      python -m cimd_jax.main with your flags, e.g.
#        bash launch/local.sh main --config=configs/lidc.py --workdir=runs/lidc --mode=train
#   bash launch/local.sh bench [flags]     python -m cimd_jax.bench
#
# Edit nothing here; set CIMD_VENV to put the environment elsewhere, PYTHON to pick
# the interpreter (Python 3.11), WORKDIR for the demo's output folder.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CIMD_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3

if [ ! -x "$VENV/bin/python" ]; then
  echo "[local.sh] creating virtual environment in $VENV"
  "$PYTHON_BIN" -m venv "$VENV"
fi

# Install the pinned requirements once; re-install when requirements.txt changes.
STAMP="$VENV/.cimd_requirements.sha256"
WANT="$(sha256sum "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[local.sh] installing requirements into $VENV (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements.txt"
  "$VENV/bin/python" -m pip install --quiet --no-deps -e "$ROOT"
  echo "$WANT" > "$STAMP"
fi

export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
cd "$ROOT"
cmd="${1:-}"
shift || true
case "$cmd" in
  demo)
    exec "$VENV/bin/python" -m cimd_jax.main --mode=demo \
      --config=configs/demo.py --workdir="${WORKDIR:-runs/demo}" "$@"
    ;;
  test)
    # The launch-script test runs shellcheck; install it from Debian if we can.
    if ! command -v shellcheck >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      (apt-get update -qq && apt-get install -y -qq shellcheck) >/dev/null 2>&1 || true
    fi
    # Two workers (one per core of the target machine); each test file runs whole on
    # one worker, so a file's module fixtures are built once.
    exec "$VENV/bin/python" -m pytest -q -n "${CIMD_TEST_WORKERS:-2}" --dist loadfile tests "$@"
    ;;
  main)
    exec "$VENV/bin/python" -m cimd_jax.main "$@"
    ;;
  bench)
    exec "$VENV/bin/python" -m cimd_jax.bench "$@"
    ;;
  *)
    echo "usage: bash launch/local.sh demo|test|main|bench [args...]" >&2
    exit 2
    ;;
esac
