#!/usr/bin/env bash
# Starts a Sentinel. Sentinel rewrites its config with what it learns (current
# master, epochs, known peers), so that file lives on the volume and is seeded from
# the stack's template only when absent. On later starts the template's settings
# (quorum, timeouts, auth) are applied again while the learned state is kept.
set -euo pipefail

: "${SENTINEL_NODE:?SENTINEL_NODE names this Sentinel (its hostname)}"
: "${REDIS_MASTER_NAME:=transvidio}"
: "${REDIS_PASSWORD_FILE:?REDIS_PASSWORD_FILE holds the password of the sentinel user}"
: "${SENTINEL_ACL_FILE:?SENTINEL_ACL_FILE holds the users of the Sentinel}"
: "${DATA_SUBNET:?DATA_SUBNET is the data network, where this Sentinel has its address}"
TEMPLATE=/etc/transvidio/redis/$SENTINEL_NODE.conf
STATE=/data/sentinel.conf

log() { printf '%s sentinel[%s]: %s\n' "$(date -u +%FT%TZ)" "$SENTINEL_NODE" "$*" >&2; }

# shellcheck source=sentinels.sh
. /usr/local/lib/transvidio/sentinels.sh

# Sentinel works with addresses only: announced, monitored, handed out. A name it had to
# resolve could be one that is gone (a swarm task on a lost node), and each lookup of such a
# name stalls its one event loop until it tilts instead of failing over.
address=$(own_address "$DATA_SUBNET")
if [ -z "$address" ]; then
    log "no address of this container is in $DATA_SUBNET"
    exit 1
fi

password=$(cat "$REDIS_PASSWORD_FILE")
umask 077
next=$(mktemp /data/sentinel.conf.XXXXXX)
{
    if [ -s "$STATE" ]; then
        # Keep the monitored master's current address, take the quorum from the template.
        quorum=$(awk -v name="$REDIS_MASTER_NAME" '$1 == "sentinel" && $2 == "monitor" && $3 == name {print $6}' "$TEMPLATE")
        current=$(awk -v name="$REDIS_MASTER_NAME" '$1 == "sentinel" && $2 == "monitor" && $3 == name {print $4, $5}' "$STATE")
        log "state found: master is $current"
        awk '!($1 == "sentinel" && $2 == "monitor")' "$TEMPLATE" | grep -v '^#'
        printf 'sentinel monitor %s %s %s\n' "$REDIS_MASTER_NAME" "$current" "$quorum"
        # What Sentinel learned: its id, epochs, known replicas and Sentinels.
        awk '$1 == "sentinel" && ($2 == "myid" || $2 ~ /epoch$/ || $2 ~ /^known-/)' "$STATE"
    else
        # The initial master, by name on a swarm: wait until it resolves (once it is healthy).
        read -r initial port quorum < <(awk -v name="$REDIS_MASTER_NAME" \
            '$1 == "sentinel" && $2 == "monitor" && $3 == name {print $4, $5, $6}' "$TEMPLATE")
        until master=$(resolve_address "$initial"); do
            notice "waiting for the initial master $initial to resolve"
            sleep 1
        done
        log "no state: seeding from the template, master $initial at $master"
        awk '!($1 == "sentinel" && $2 == "monitor")' "$TEMPLATE" | grep -v '^#'
        printf 'sentinel monitor %s %s %s %s\n' "$REDIS_MASTER_NAME" "$master" "$port" "$quorum"
    fi
    printf 'sentinel announce-ip %s\n' "$address"
    # The users (what Sentinel rewrote into its state is dropped above: these are current),
    # and this Sentinel's own password, for the data nodes and the other Sentinels.
    cat "$SENTINEL_ACL_FILE"
    printf 'sentinel sentinel-pass "%s"\n' "$password"
    printf 'sentinel auth-pass %s "%s"\n' "$REDIS_MASTER_NAME" "$password"
} >"$next"
# Order matters: global options (resolve-hostnames) before the monitor line, and
# the options that name the master after it.
awk -v name="$REDIS_MASTER_NAME" '!($1 == "sentinel" && $3 == name)' "$next" >"$STATE.new"
awk -v name="$REDIS_MASTER_NAME" '$1 == "sentinel" && $2 == "monitor" && $3 == name' "$next" >>"$STATE.new"
awk -v name="$REDIS_MASTER_NAME" '$1 == "sentinel" && $2 != "monitor" && $3 == name' "$next" >>"$STATE.new"
rm -f "$next"
mv "$STATE.new" "$STATE"
unset password
exec redis-server "$STATE" --sentinel
