#!/bin/sh
# Install Debian's headless-capable Chromium for the HTML report test (tests/pipeline/test_report.py).
# Idempotent: does nothing when /usr/bin/chromium is already there. Never fails the caller: where it
# cannot install (not root, no apt, no network) it says why and the report test skips itself.
set -u
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "install-chromium: not root, cannot apt-get install chromium (the HTML report test will skip)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-chromium: no apt-get on this system (the HTML report test will skip)" >&2
    exit 0
fi
# DEBIAN_FRONTEND keeps apt from asking questions in CI or under make.
if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium); then
    echo "install-chromium: apt-get install chromium failed (the HTML report test will skip)" >&2
fi
exit 0
