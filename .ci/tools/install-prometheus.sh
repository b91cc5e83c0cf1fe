#!/usr/bin/env bash
# Prometheus and promtool for the monitoring tests, from Debian's `prometheus` package
# (/usr/bin/prometheus, /usr/bin/promtool). Installing needs root (CI runs as root).
# The package's daemon is never started: a policy-rc.d that denies service starts is put in
# place for the install when the machine has none. Idempotent: a no-op when both are there.
set -euo pipefail

print_version() {
    local version
    version=$(prometheus --version 2>&1 | awk 'NR==1 {print $3}')
    echo "prometheus $version ($(command -v prometheus), $(command -v promtool))"
}

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    print_version
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-prometheus.sh: prometheus/promtool are missing; installing them needs root." >&2
    echo "  Run as root: $0   (or: apt-get install --no-install-recommends prometheus)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
cleanup=(rm -f "$log")
if [ ! -e /usr/sbin/policy-rc.d ]; then
    # invoke-rc.d and deb-systemd-invoke ask this before starting a service; 101 = "not allowed".
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    cleanup+=(/usr/sbin/policy-rc.d)
fi
trap '"${cleanup[@]}"' EXIT

# Bounded waits everywhere: the dpkg lock, each download, and the whole command.
apt_options=(-q -o DPkg::Lock::Timeout=120 -o Acquire::http::Timeout=30 -o Acquire::Retries=3)
apt_install() {
    timeout 600 apt-get "${apt_options[@]}" -y --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        install prometheus </dev/null >>"$log" 2>&1
}
apt_update() { timeout 300 apt-get "${apt_options[@]}" update </dev/null >>"$log" 2>&1; }
# A fresh machine may have no package lists, or stale ones: update once and retry.
if ! apt_install && ! { apt_update && apt_install; }; then
    cat "$log" >&2
    echo "install-prometheus.sh: apt-get install prometheus failed (log above)" >&2
    exit 1
fi

for tool in prometheus promtool; do
    if ! command -v "$tool" >/dev/null; then
        cat "$log" >&2
        echo "install-prometheus.sh: $tool is missing after the install (log above)" >&2
        exit 1
    fi
done
print_version
