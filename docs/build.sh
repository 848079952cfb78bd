#!/usr/bin/env bash
# Build the HTML documentation into docs/_build/html; any warning fails the build.
# Needs the package and its "doc" extra installed: pip install -e ".[doc]", and Graphviz's
# dot for the workflow graphs (apt-get install graphviz).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v dot > /dev/null; then
    echo "docs/build.sh: Graphviz's dot is not installed (the workflow graphs need it: apt-get install graphviz)" >&2
    exit 1
fi
sphinx-build -W --keep-going -b html docs docs/_build/html "$@"
