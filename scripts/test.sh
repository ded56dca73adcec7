#!/usr/bin/env bash
# Installs what the tests need and runs them: the Python packages, Debian's Chromium for the browser
# tests and Debian's PostgreSQL for the shared job queue's tests where apt-get can install them (they
# skip, saying why, where it cannot).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k caption`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements-dev.txt
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's chromium for the browser tests ..." >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# the shared job queue's tests (tests/test_pg_queue.py) start a throwaway PostgreSQL server of their own
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's postgresql for the job queue's tests ..." >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
# pytest exits 5 when no test ran; that is a failure here too (set -e).
exec python -m pytest "$@"
