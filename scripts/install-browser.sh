#!/usr/bin/env bash
# Installs the browser the dashboard tests drive: Debian's `chromium` and `chromium-driver`
# (which gives `chromedriver`), with apt-get, when either command is missing. Needs root (CI
# runs as root) and no network beyond Debian's package mirrors. A second run with both present
# does nothing. Quiet unless it installs.
set -euo pipefail

say() { echo "install-browser: $*" >&2; }

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  say "chromium or chromedriver is missing and this is not root; run: sudo apt-get install chromium chromium-driver"
  exit 1
fi
say "chromium or chromedriver is missing; installing chromium and chromium-driver"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || {
  say "chromium-driver was installed but chromium or chromedriver is still not on PATH"
  exit 1
}
