#!/usr/bin/env bash
# Sourced by engine.sh and swarm.sh: daemons they started, known by their pidfiles.

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# TERM, then up to 60 s for the daemon to exit (dockerd stops its containers and
# containerd first), then KILL; the pidfile goes.
stop_pid() {
    local pidfile=$1 pid waited=0
    alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 300 ]; do
        sleep 0.2
        waited=$((waited + 1))
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}
