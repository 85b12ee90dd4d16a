#!/usr/bin/env bash
# Ends a lost primary's leader lock early, so that a failover takes seconds, not Patroni's TTL.
#
# Patroni's leader key lives on the primary's etcd lease (TTL at least 20 s, Patroni's
# minimum), which the primary's Patroni renews every loop (loop_wait, 1 s here). A primary
# that cannot renew it demotes itself within loop_wait + retry_timeout, and the stack sets
# both so that this is at least a second less than FAILOVER_DETECT_SECONDS. Beside each
# replica's Patroni this loop revokes the lease (and so the leader and member keys: the
# replicas hold their election at once) only when both are true:
#   - the lease has not been renewed for FAILOVER_DETECT_SECONDS: its primary is gone, or
#     has demoted itself by now, by the same rule that makes Patroni's TTL safe;
#   - from here the primary answers on neither PostgreSQL's port nor Patroni's: a primary
#     whose Patroni is stalled but whose server still runs (a frozen process, a paused
#     container: the kernel still accepts connections) is left to the TTL.
# Anything else (etcd not answering, no leader, this node the leader) is waited out.
#
# Usage: leader-fence.sh ETCD_ENDPOINTS KEY_PREFIX   (FAILOVER_DETECT_SECONDS in the environment)
set -uo pipefail

: "${FAILOVER_DETECT_SECONDS:?FAILOVER_DETECT_SECONDS: seconds without lease renewal (0: off)}"
: "${PG_NODE:?PG_NODE names this node}"
CHECK_SECONDS=${FENCE_CHECK_SECONDS:-0.25}

log() { printf '%s leader-fence[%s]: %s\n' "$(date -u +%FT%TZ)" "$PG_NODE" "$*" >&2; }

if [ "$FAILOVER_DETECT_SECONDS" = 0 ]; then
    exit 0
fi

endpoints=$1 # etcd's client URLs, comma-separated
prefix=$2    # the cluster's keys: /<namespace>/<scope>

etcd() { etcdctl --endpoints="$endpoints" --command-timeout=1s "$@"; }

# Whether something accepts a TCP connection at host:port within a second.
# shellcheck disable=SC2016 # expanded by the inner shell, from its own arguments
answers() { timeout 1 bash -c ': >"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null; }

# The values of the named fields in etcdctl's `-w fields` answer on stdin, in the order named
# (an absent field is empty). Read by bash itself: the loop starts no parser.
fields() {
    local line key text name
    local -A value=()
    while IFS= read -r line; do
        [[ $line =~ ^\"([A-Za-z]+)\"\ :\ (.*)$ ]] || continue
        key=${BASH_REMATCH[1]} text=${BASH_REMATCH[2]}
        # A string comes quoted ("Value" : "postgres-primary"); member names need no unescaping.
        [[ $text =~ ^\"(.*)\"$ ]] && text=${BASH_REMATCH[1]}
        value[$key]=$text
    done
    for name in "$@"; do
        printf '%s ' "${value[$name]-}"
    done
    echo
}

# The leader's member name and its lease id (hex, as etcdctl takes it); "self" when this node
# holds the lock; nothing (and a failure) when there is no leader or etcd does not answer.
leader_lease() {
    local leader lease
    read -r leader lease < <(etcd get "$prefix/leader" -w fields 2>/dev/null | fields Value Lease)
    [ -n "$leader" ] && [ -n "$lease" ] || return 1
    if [ "$leader" = "$PG_NODE" ]; then
        echo self
    else
        printf '%s %x\n' "$leader" "$lease"
    fi
}

# "host pg_port api_port" of a member, from its key.
member_ports() {
    etcd get "$prefix/members/$1" --print-value-only 2>/dev/null | jq -r \
        '(.conn_url | capture("//(?<host>[^:/]+):(?<port>[0-9]+)")) as $pg
         | (.api_url | capture(":(?<port>[0-9]+)/")) as $api
         | "\($pg.host) \($pg.port) \($api.port)"'
}

# Every check starts etcdctl: while the lock is renewed, the next check waits until the lock
# could first be silent long enough, and only then runs CHECK_SECONDS apart; on the node that
# holds the lock it waits FAILOVER_DETECT_SECONDS - 1.
warned=""
pause=$CHECK_SECONDS
while true; do
    sleep "$pause"
    pause=1 # no leader to watch (or etcd not answering): look again in a second
    read -r leader lease < <(leader_lease) || continue
    if [ "$leader" = self ]; then
        # Nothing to watch while this node holds the lock. A leader that takes it over has just
        # written it, so its lock cannot be silent for FAILOVER_DETECT_SECONDS before then.
        pause=$((FAILOVER_DETECT_SECONDS - 1))
        continue
    fi
    read -r granted remaining < <(etcd lease timetolive "$lease" -w fields 2>/dev/null | fields GrantedTTL TTL)
    # An expired or unknown lease reports TTL -1: Patroni's own expiry is under way.
    ((${remaining:--1} >= 0)) || continue
    silent=$((${granted:-0} - remaining))
    if ((silent < FAILOVER_DETECT_SECONDS)); then
        warned=""
        # Asleep until the lock could first have been silent long enough.
        pause=$((FAILOVER_DETECT_SECONDS - silent - 1))
        ((pause > 0)) || pause=$CHECK_SECONDS
        continue
    fi
    pause=$CHECK_SECONDS
    read -r host pg_port api_port < <(member_ports "$leader") || continue
    if answers "$host" "$pg_port" || answers "$host" "$api_port"; then
        # Once per silent lease: a lease renewed in time, or another leader's, is a new silence.
        [ "$warned" = "$lease" ] || log "$leader has not renewed its lock for ${silent}s but still answers: left to its TTL"
        warned=$lease
        continue
    fi
    log "$leader has not renewed its lock for ${silent}s and answers on no port: ending its lease $lease"
    etcd lease revoke "$lease" >/dev/null 2>&1 || log "lease $lease not revoked (another replica may have ended it first)"
done
