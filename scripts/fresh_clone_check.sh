#!/usr/bin/env bash
# The check CI makes, on this machine: clone the committed tree into a temporary folder and run .ci/run there
# (a fresh .venv, the README's install and test commands), so nothing installed by hand can hide a failure.
#   bash scripts/fresh_clone_check.sh            # HEAD of this checkout
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
git clone -q "$src" "$dir/sdlora"
cd "$dir/sdlora"
echo "fresh clone of $(git rev-parse --short HEAD) in $dir/sdlora" >&2
time bash .ci/run
