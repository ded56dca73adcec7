#!/usr/bin/env bash
# Installs what the tests need and runs them: the Python packages, and Debian's Chromium for the
# browser tests where apt-get can install it (they skip, saying why, where it cannot).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k caption`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements-dev.txt
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's chromium for the browser tests ..." >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# pytest exits 5 when no test ran; that is a failure here too (set -e).
exec python -m pytest "$@"
