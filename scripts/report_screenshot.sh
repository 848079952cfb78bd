#!/usr/bin/env bash
# Look at a report as a person would: headless Chromium renders an HTML report to a PNG.
#   bash scripts/report_screenshot.sh OUT/sub-01.html sub-01.png [WIDTHxHEIGHT]
# Needs Debian's chromium (apt-get install chromium).
set -euo pipefail
html=$(realpath "$1"); png=$2; size=${3:-1100x1400}
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars \
    --window-size="${size/x/,}" --screenshot="$png" "file://$html" 2>/dev/null
echo "$png"
