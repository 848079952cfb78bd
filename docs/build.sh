#!/usr/bin/env bash
# Build the HTML documentation into docs/_build/html; any warning fails the build.
# Needs the package and its "doc" extra installed: pip install -e ".[doc]"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
sphinx-build -W --keep-going -b html docs docs/_build/html "$@"
