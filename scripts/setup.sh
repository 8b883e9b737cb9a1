#!/usr/bin/env bash
# Set up .venv for cryofastar-stream on a fresh machine (CPU). Idempotent.
#   bash scripts/setup.sh          # the package and its command-line tool
#   bash scripts/setup.sh --test   # ... plus the test dependencies, Debian's chromium for the
#                                  # dashboard's browser tests (Playwright never downloads a browser of
#                                  # its own) and Debian's relion (RELION 3.1, CPU) for the convention
#                                  # tests against RELION's own programs (apt-get, when missing)
# torch is installed FIRST and pinned (torch==2.13.0, the CPU build), so that no
# dependency can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
target="."
[ "${1:-}" = "--test" ] && target=".[test]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$target"
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
missing=()
if [ "${1:-}" = "--test" ]; then
  [ -x "${CRYOFASTAR_CHROMIUM:-/usr/bin/chromium}" ] || missing+=(chromium fonts-dejavu-core)
  command -v relion_reconstruct >/dev/null 2>&1 || missing+=(relion)  # RELION 3.1, CPU: the convention tests' peer
fi
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "warning: no apt-get: install ${missing[*]} (set CRYOFASTAR_CHROMIUM for the browser tests)" >&2
  fi
fi
