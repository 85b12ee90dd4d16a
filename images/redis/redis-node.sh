#!/usr/bin/env bash
# Starts a Redis data node that follows whoever the Sentinels say is master.
# A node never assumes it is master when it has data: a restarted old master that
# did so would become a second master. Only on the cluster's first start (no data,
# no Sentinel answering) does the initial master (INITIAL_MASTER) take the role.
set -euo pipefail

CONF_DIR=/etc/transvidio/redis
RUN_CONF=/var/lib/redis/run/redis.conf
: "${REDIS_NODE:?REDIS_NODE names this node (its hostname)}"
: "${DATA_SUBNET:?DATA_SUBNET is the data network, where this node has its address}"
: "${INITIAL_MASTER:?INITIAL_MASTER is the address or name of the node that is master on first start}"
: "${REDIS_SENTINELS:?REDIS_SENTINELS lists host:port of every Sentinel}"
: "${REDIS_USER:?REDIS_USER names the user this node replicates and asks the Sentinels as}"
: "${REDIS_PASSWORD_FILE:?REDIS_PASSWORD_FILE holds the password of that user}"
: "${REDIS_MASTER_NAME:=transvidio}"
: "${DOWN_AFTER_MS:=30000}"
: "${FAILOVER_TIMEOUT_MS:=180000}"
# A Sentinel that finds no replica with fresh enough INFO aborts and retries a failover
# only after 2 x failover-timeout: wait out one retry before resuming as master.
FAILOVER_WAIT_SECONDS=$((2 * FAILOVER_TIMEOUT_MS / 1000 + 5))

log() { printf '%s redis-node[%s]: %s\n' "$(date -u +%FT%TZ)" "$REDIS_NODE" "$*" >&2; }

REDISCLI_AUTH=$(cat "$REDIS_PASSWORD_FILE")
export REDISCLI_AUTH

# shellcheck source=sentinels.sh
. /usr/local/lib/transvidio/sentinels.sh

failover_started() { [[ "$1" == OK || "$1" == *INPROG* ]]; }

has_data() { [ -d /data/appendonlydir ] || [ -s /data/dump.rdb ]; }

# Our address, and the one this node announced before its restart (kept with its data): on
# a swarm a restarted task has a new address, and the Sentinels may still name the old one.
ADDRESS_FILE=/data/announced-address
REDIS_ANNOUNCE_IP=$(own_address "$DATA_SUBNET")
if [ -z "$REDIS_ANNOUNCE_IP" ]; then
    log "no address of this container is in $DATA_SUBNET"
    exit 1
fi
previous_address=$(cat "$ADDRESS_FILE" 2>/dev/null || true)
is_me() { [ "$1" = "$REDIS_ANNOUNCE_IP" ] || { [ -n "$previous_address" ] && [ "$1" = "$previous_address" ]; }; }
moved() { [ -n "$previous_address" ] && [ "$previous_address" != "$REDIS_ANNOUNCE_IP" ]; }

answers() { [ "$(timeout 2 redis-cli -h "$1" -p 6379 --user "$REDIS_USER" --no-auth-warning PING 2>/dev/null)" = PONG ]; }

master=""
while :; do
    if named=$(ask_sentinels); then
        if is_me "$named"; then
            master=$named
            log "Sentinels say the master is $master: this node"
            break
        fi
        # A replica at a new address (a swarm task) is one the Sentinels do not know yet: it
        # follows only a master that answers, as one following a master that is gone would
        # never be moved to the next. At its old address the Sentinels move it after a failover.
        if ! moved || answers "$named"; then
            master=$named
            log "Sentinels say the master is $master"
            break
        fi
        notice "the Sentinels name $named as master, which does not answer: waiting for a failover"
    elif ! has_data; then
        # On a swarm the initial master is a name, which resolves once its task is healthy.
        if master=$(resolve_address "$INITIAL_MASTER"); then
            log "no Sentinel answers and no data here: first start, initial master is $master"
            break
        fi
        notice "first start: waiting for the initial master $INITIAL_MASTER to resolve"
    else
        # Data and nobody to ask: starting as master could make a second master, and
        # following a guess can close a replication loop (the guess following us). Wait,
        # however long it takes, for a Sentinel; what it says then decides, as on any start.
        # A guess would also make things worse later: a replica whose link to the master
        # was down for over 10 x down-after is one Sentinel never promotes.
        notice "no Sentinel answers and this node has data: waiting for a Sentinel before starting"
    fi
    sleep 1
done

request_failover() {
    local answer
    answer=$(sentinel_query first_line failover_started failover "$REDIS_MASTER_NAME") || return 1
    log "a Sentinel started the failover: $answer"
}

# How many replicas the first Sentinel that answers knows as up (its flags just "slave":
# not down, not disconnected); "unknown" when no Sentinel answers with a replica list.
replicas_up() {
    local entry answer
    IFS=',' read -r -a entries <<<"$REDIS_SENTINELS"
    for entry in "${entries[@]}"; do
        answer=$(timeout 2 redis-cli -h "${entry%:*}" -p "${entry##*:}" --user "$REDIS_USER" --no-auth-warning \
            SENTINEL replicas "$REDIS_MASTER_NAME" 2>/dev/null) || continue
        # A list of field/value lines, or nothing at all; anything else is an error reply.
        if [ -z "$answer" ] || [ "${answer%%$'\n'*}" = name ]; then
            awk 'previous == "flags" && $0 == "slave" {up++} {previous = $0} END {print up + 0}' <<<"$answer"
            return 0
        fi
    done
    echo unknown
}

if is_me "$master" && has_data; then
    # We were the master and went down (a crash, a kill, a replacement). Our data may lack
    # the last writes (appendfsync everysec) while a replica holds everything acknowledged
    # with WAIT: stay down, have the Sentinels promote that replica now (rather than after
    # down-after-milliseconds), then follow it. Only if nobody can take over do we resume
    # as master.
    log "the Sentinels still name me master after a restart: asking for a failover"
    deadline=$((SECONDS + DOWN_AFTER_MS / 1000 + FAILOVER_WAIT_SECONDS))
    if ! request_failover; then
        # With no replica up (every data node replaced at once, by a config change, say),
        # nobody can take over: waiting would only keep the group without a master.
        if [ "$(replicas_up)" = 0 ]; then
            log "no failover, and the Sentinels know no replica that is up: nobody can take over"
            deadline=$SECONDS
        else
            log "no Sentinel started a failover; waiting for one to detect us down"
        fi
    fi
    while [ "$SECONDS" -lt "$deadline" ]; do
        if answer=$(ask_sentinels) && ! is_me "$answer"; then
            master=$answer
            log "the Sentinels promoted $master: following it"
            break
        fi
        sleep 0.2
    done
    if is_me "$master"; then
        log "no replica took over: resuming as master"
        if [ "$master" != "$REDIS_ANNOUNCE_IP" ]; then
            # Our address changed (a swarm task): the Sentinels watch the old one, and only an
            # operator can point them here (README: Deploying onto a swarm).
            log "the Sentinels name $master, this node's address before its restart; it is now $REDIS_ANNOUNCE_IP"
        fi
    fi
fi

# A restore (RESTORE_FROM: a backup's file name, or latest) is for an empty node that is to
# be master: the cluster's first start on wiped volumes. Its data set is the backup's.
if [ -n "${RESTORE_FROM:-}" ] && is_me "$master" && ! has_data; then
    if [ "$RESTORE_FROM" = latest ]; then
        backup=$(find /backups -maxdepth 1 -name 'redis-*.rdb' -printf '%f\n' | sort | tail -n 1)
    else
        backup=$RESTORE_FROM
    fi
    if [ -z "$backup" ] || [ ! -s "/backups/$backup" ]; then
        log "restore from ${RESTORE_FROM}: no such backup in /backups; refusing to start empty"
        exit 65
    fi
    cp "/backups/$backup" /data/dump.rdb.part
    mv /data/dump.rdb.part /data/dump.rdb
    # With appendonly on, Redis loads only an AOF: a private server loads the RDB and
    # writes the AOF from it, then the node starts as usual.
    redis-server --port 0 --unixsocket /var/lib/redis/run/restore.sock --unixsocketperm 700 --dir /data \
        --dbfilename dump.rdb --appendonly no --daemonize no --save '' >/var/lib/redis/run/restore.log 2>&1 &
    restorer=$!
    cli=(env -u REDISCLI_AUTH redis-cli -s /var/lib/redis/run/restore.sock)  # the private server has no users
    until [ "$("${cli[@]}" PING 2>/dev/null)" = PONG ]; do
        kill -0 "$restorer" 2>/dev/null || { cat /var/lib/redis/run/restore.log >&2; exit 1; }
        sleep 0.2
    done
    "${cli[@]}" CONFIG SET appendonly yes >/dev/null
    # Done once the rewrite that makes the AOF from memory has run and none is in progress.
    until info=$("${cli[@]}" INFO persistence | tr -d '\r') && grep -qx 'aof_rewrite_in_progress:0' <<<"$info" &&
        grep -qx 'aof_rewrite_scheduled:0' <<<"$info" && ! grep -qx 'aof_rewrites:0' <<<"$info"; do
        sleep 0.2
    done
    keys=$("${cli[@]}" DBSIZE)
    "${cli[@]}" SHUTDOWN NOSAVE >/dev/null 2>&1 || true
    wait "$restorer" || true
    log "restored the data set of backup $backup: $keys keys"
fi

password=$REDISCLI_AUTH
umask 077
{
    # The rendered config names the ACL file and masteruser; only the password is added.
    cat "$CONF_DIR/$REDIS_NODE.conf"
    printf 'masterauth "%s"\n' "$password"
    # An address, not a name: Sentinel never resolves a name that may be gone.
    printf 'replica-announce-ip %s\n' "$REDIS_ANNOUNCE_IP"
    if ! is_me "$master"; then
        printf 'replicaof %s 6379\n' "$master"
    fi
} >"$RUN_CONF"
printf '%s\n' "$REDIS_ANNOUNCE_IP" >"$ADDRESS_FILE"
unset password REDISCLI_AUTH
exec redis-server "$RUN_CONF"
