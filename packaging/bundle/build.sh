#!/usr/bin/env bash
# Build the desktop bundle (dist/corral/) from the environment of PYTHON (default .venv's).
# The bundle carries the llama-cpp-python of that environment: for a bundle that other
# machines run, install that one with `python packaging/install_llama.py --portable`.
#   packaging/bundle/build.sh [DIST_DIR]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$here/../../.venv/bin/python}"
dist="${1:-dist}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -c 'import PyInstaller' 2>/dev/null || "$python" -m pip install -q "pyinstaller>=6"
"$python" -m PyInstaller --noconfirm --log-level WARN --distpath "$dist" --workpath "$work" \
  "$here/corral.spec"
echo "bundle: $dist/corral/corral"
