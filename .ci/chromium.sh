#!/usr/bin/env bash
# Print the path of a headless-capable Chromium, installing Debian's `chromium` package (apt-get, as root)
# when none is on PATH. Exit 1 with the reason on stderr when there is none and it cannot be installed.
# Used by tests/test_report_html.py (which fails in CI, and skips elsewhere, when this exits 1).
set -uo pipefail

find_browser() {
  local b
  for b in chromium chromium-browser google-chrome-stable google-chrome; do
    if command -v "$b" >/dev/null 2>&1; then
      command -v "$b"
      return 0
    fi
  done
  return 1
}

find_browser && exit 0
command -v apt-get >/dev/null 2>&1 || { echo "no chromium on PATH and no apt-get to install it" >&2; exit 1; }
[[ $(id -u) == 0 ]] || { echo "no chromium on PATH; installing it needs root: apt-get install chromium" >&2; exit 1; }
log="${TMPDIR:-/tmp}/mnist-jobs-chromium-apt.log"
echo "installing chromium (apt-get, log: $log)" >&2
{
  DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
      chromium fonts-dejavu-core
} >"$log" 2>&1 || { tail -n 20 "$log" >&2; echo "apt-get install chromium failed (log: $log)" >&2; exit 1; }
find_browser || { echo "chromium installed but not on PATH" >&2; exit 1; }
