#!/usr/bin/env bash
# nginx, with its upstream list kept in step with the backends the stack runs.
#
# Every backend carries the network alias $UPSTREAM_NAME on the edge network. Every
# second this resolves it and asks each address for /health, all at once; a new address
# joins the upstream once it answers, one that no longer resolves leaves it, and so does
# one that misses $MISSES_TO_LEAVE answers in a row (a node cut off or a frozen process
# still resolves, and nginx would keep sending it requests: a POST sent there is lost
# after the read timeout, as nginx does not retry it elsewhere). nginx reloads gracefully
# (in-flight requests finish). Scaling the pool therefore never replaces (or restarts)
# nginx, and costs no request.
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

MISSES_TO_LEAVE=2
declare -A missed=()  # answers each address in use has missed in a row

answers() { curl -fs -o /dev/null --max-time 2 "http://$1:$UPSTREAM_PORT/health" 2>/dev/null; }

# The addresses among "$@" that answer: asked in parallel, so one that does not costs
# its timeout once, not once per address after it.
answering() {
    local address
    for address in "$@"; do
        { answers "$address" && echo "$address"; } &
    done
    wait
}

in_use() { [[ $'\n'$current$'\n' == *$'\n'"$1"$'\n'* ]]; }

# Sets `next`, the servers to use now: resolved addresses that answer, and those in use
# that have missed fewer than MISSES_TO_LEAVE answers. If none answers at all, those in
# use stay: a pool too busy to answer a probe is better tried than refused outright.
select_servers() {
    local address heard kept=""
    local -a addresses
    mapfile -t addresses < <(resolved)
    heard=$'\n'$(answering "${addresses[@]}")$'\n'
    next=""
    for address in "${addresses[@]}"; do
        if [[ $heard == *$'\n'"$address"$'\n'* ]]; then
            missed[$address]=0
            next+=$address$'\n'
        elif in_use "$address"; then
            kept+=$address$'\n'
            missed[$address]=$((${missed[$address]:-0} + 1))
            if ((missed[$address] < MISSES_TO_LEAVE)); then
                next+=$address$'\n'
            fi
        fi
    done
    if [ -z "$next" ]; then
        next=$kept
    fi
    next=${next%$'\n'}
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
    select_servers
    current=$next
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
    select_servers
    if [ "$next" != "$current" ]; then
        write_upstreams "$next"
        if nginx -c "$CONF" -t -q 2>/dev/null && kill -HUP "$nginx_pid" 2>/dev/null; then
            log "reloaded with: ${next//$'\n'/ }"
            current=$next
        fi
    fi
done
wait "$nginx_pid"
