#!/usr/bin/env bash
# nginx, with its upstream list kept in step with the backends the stack runs.
#
# Every backend carries the network alias $UPSTREAM_NAME on the edge network. Every
# second this resolves it; a new address joins the upstream once it answers /health, a
# gone one leaves it, and nginx reloads gracefully (in-flight requests finish). Scaling
# the pool therefore never replaces (or restarts) nginx, and costs no request.
set -euo pipefail

: "${UPSTREAM_NAME:?UPSTREAM_NAME is the backends network alias}"
: "${UPSTREAM_PORT:?UPSTREAM_PORT is the backends port}"
: "${UPSTREAM_FILE:?UPSTREAM_FILE is the include nginx.conf reads the servers from}"
UPSTREAM_SERVER_PARAMS=${UPSTREAM_SERVER_PARAMS:-}
CONF=/etc/transvidio/nginx/nginx.conf
INTERVAL=${UPSTREAM_CHECK_SECONDS:-1}

log() { printf '%s upstreams: %s\n' "$(date -u +%FT%TZ)" "$*" >&2; }

# Sorted, so that a shuffled DNS answer is not a change. Runs every INTERVAL: no more
# processes than getent and sort.
resolved() {
    local address _
    getent ahostsv4 "$UPSTREAM_NAME" 2>/dev/null | while read -r address _; do echo "$address"; done | sort -u
}

answers() { curl -fsS -o /dev/null --max-time 2 "http://$1:$UPSTREAM_PORT/health"; }

# The servers to use now: those still resolved that were in use, and new ones that answer.
select_servers() {
    local address
    for address in $(resolved); do
        if [[ $'\n'$current$'\n' == *$'\n'"$address"$'\n'* ]] || answers "$address"; then
            echo "$address"
        fi
    done
}

write_upstreams() {
    local address tmp="$UPSTREAM_FILE.tmp"
    {
        echo "# Written by the nginx entrypoint from the backends that resolve and answer."
        if [ -z "$1" ]; then
            echo "server 127.0.0.1:$UPSTREAM_PORT down;  # no backend yet"
        fi
        for address in $1; do
            echo "server $address:$UPSTREAM_PORT $UPSTREAM_SERVER_PARAMS;"
        done
    } >"$tmp"
    mv "$tmp" "$UPSTREAM_FILE"
}

# At start, backends that resolve get a few seconds to answer: the first connection from a
# container that has just started can fail before its network is settled, and an empty
# upstream list would answer the first clients with 502.
current=""
for _ in 1 2 3 4 5 6 7 8 9 10; do
    current=$(select_servers)
    if [ -n "$current" ] || [ -z "$(resolved)" ]; then
        break
    fi
    sleep 0.5
done
write_upstreams "$current"
log "starting with: ${current//$'\n'/ }"
nginx -c "$CONF" -g 'daemon off;' &
nginx_pid=$!
# SIGQUIT (the image's stop signal) is nginx's graceful shutdown: pass it on, and TERM too.
trap 'kill -QUIT "$nginx_pid" 2>/dev/null' QUIT
trap 'kill -TERM "$nginx_pid" 2>/dev/null' TERM INT

while kill -0 "$nginx_pid" 2>/dev/null; do
    sleep "$INTERVAL" &
    wait $! || true
    next=$(select_servers)
    if [ "$next" != "$current" ]; then
        write_upstreams "$next"
        if nginx -c "$CONF" -t -q 2>/dev/null && kill -HUP "$nginx_pid" 2>/dev/null; then
            log "reloaded with: ${next//$'\n'/ }"
            current=$next
        fi
    fi
done
wait "$nginx_pid"
