#!/usr/bin/env bash
# Install the system Chromium that the reader page's browser test drives (tests/serve/test_web_page.py),
# from Debian's packages: no browser download. Idempotent and quiet; run as root (CI) or with sudo.
# Without apt-get it stops with an error, and the browser test then fails saying so (it never skips).
set -euo pipefail

CHROMIUM="${SPIKINGBRAIN_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
    echo "browser: $("$CHROMIUM" --version 2>/dev/null || echo chromium) at $CHROMIUM"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "browser: no $CHROMIUM and no apt-get; install Chromium with your package manager, or set SPIKINGBRAIN_CHROMIUM to its path" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "browser: installing Chromium needs root; run 'sudo $0'" >&2
        exit 1
    fi
    SUDO="sudo"
fi
echo "browser: apt-get install chromium"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq chromium >/dev/null
echo "browser: $("$CHROMIUM" --version 2>/dev/null || echo chromium) at $CHROMIUM"
