#!/bin/sh
# Installs QEMU 10 (Debian bookworm-backports) for the blackout bench's side-by-side mode
# (CPR_BENCH_QEMU=1). Not used by CI. Needs root.
set -eu
if command -v qemu-system-x86_64 >/dev/null 2>&1; then
    exit 0
fi
list=/etc/apt/sources.list.d/cpr-bench-backports.list
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" > "$list"
fi
apt-get update -qq
apt-get install -y -qq -t bookworm-backports qemu-system-x86 >/dev/null
qemu-system-x86_64 --version | head -n 1
