#!/usr/bin/env bash
# Debian's chromium and chromium-driver for the real-browser test (tests/test_ui_browser.py), installed from the
# system's package sources when missing (as root, e.g. in CI); nothing is downloaded by the test itself.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "scripts/browser.sh: /usr/bin/chromium or /usr/bin/chromedriver is missing and this is not root with apt-get:" \
       "install Debian's chromium and chromium-driver to run the browser test (it is skipped, or fails under CI=true)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
echo "scripts/browser.sh: installing chromium and chromium-driver (apt-get)"
if ! apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; then
  apt-get update -q >/dev/null
  apt-get install -y -q chromium chromium-driver >/dev/null
fi
