#!/usr/bin/env bash
# Make a Docker daemon answer on this machine (CI: a fresh Debian machine without systemd, run as root).
# Installs docker.io and debootstrap when missing (apt-get), removes the pid file a killed dockerd left, starts
# dockerd in the background with its log in $DOCKERD_LOG, and waits until `docker info` answers.
set -euo pipefail
LOG=${DOCKERD_LOG:-/var/log/dockerd.log}
PIDFILE=/var/run/docker.pid

if docker info >/dev/null 2>&1; then
    exit 0
fi
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    if [ "$(id -u)" != 0 ]; then
        echo "error: ${missing[*]} missing; install as root: apt-get install docker.io debootstrap" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ "$(id -u)" != 0 ]; then
    echo "error: no Docker daemon answers and starting dockerd needs root: sudo $0" >&2
    exit 1
fi
if [ -f "$PIDFILE" ] && ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    rm -f "$PIDFILE"  # left by a dockerd that was killed: it blocks the next start
fi
mkdir -p "$(dirname "$LOG")"
setsid dockerd --host unix:///var/run/docker.sock >"$LOG" 2>&1 </dev/null &
for _ in $(seq 120); do
    if docker info >/dev/null 2>&1; then
        echo "dockerd running (pid $(cat "$PIDFILE"), log $LOG)"
        exit 0
    fi
    sleep 0.5
done
echo "error: dockerd did not answer within 60 s; its log ($LOG) ends with:" >&2
tail -n 5 "$LOG" >&2
exit 1
