#!/usr/bin/env bash
# Install the package with its test extras (versions pinned by constraints.txt) and run the test suite.
# Usage: bash tools/test.sh [pytest args]   e.g. bash tools/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=False
python -m pip install -q --disable-pip-version-check -c constraints.txt ".[dev,studio]"
rm -rf build  # setuptools' build dir would shadow edits on the next install
python -m pytest -q "$@"
