#!/usr/bin/env bash
# The Redis group's backups.
#   serve  every BACKUP_INTERVAL_MINUTES, copy the group's data set into /backups as
#          redis-<UTC time>.rdb (an RDB made for this copy by Redis's replication protocol:
#          `redis-cli --rdb`, as the replica user), and keep the newest BACKUP_RETENTION;
#   check  healthy while the last attempt succeeded within two intervals (or the first is
#          still due).
# The copy comes from a replica that streams, as the Sentinels see it now: a copy taken
# from the master shows up in the master's INFO as one more replica (at port 0), which
# every Sentinel polling INFO at that moment then lists for good as a replica that is
# down. Only with no such replica for REPLICA_WAIT_SECONDS (every replica down) is the
# master, whichever node the Sentinels name now, the source; that copy may leave that
# entry behind.
set -euo pipefail

: "${REDIS_SENTINELS:?REDIS_SENTINELS lists host:port of every Sentinel}"
: "${REDIS_USER:?REDIS_USER names the user the copy is made as}"
: "${REDIS_PASSWORD_FILE:?REDIS_PASSWORD_FILE holds the password of that user}"
: "${BACKUP_INTERVAL_MINUTES:?BACKUP_INTERVAL_MINUTES is the time between two backups}"
: "${BACKUP_RETENTION:?BACKUP_RETENTION is how many backups are kept}"
: "${REDIS_MASTER_NAME:=transvidio}"
REPLICA_WAIT_SECONDS=${REPLICA_WAIT_SECONDS:-120}
no_replica_since=""
BACKUPS=/backups
STATE=/var/lib/redis/run

log() { printf '%s redis-backup: %s\n' "$(date -u +%FT%TZ)" "$*" >&2; }

backup_once() {
    local source port role=replica name
    if read -r source port < <(streaming_replica); then
        no_replica_since=""
    else
        # At the group's start the Sentinels have not yet seen a replica stream: wait for
        # one, for up to REPLICA_WAIT_SECONDS, before the master is copied.
        no_replica_since=${no_replica_since:-$SECONDS}
        if [ $((SECONDS - no_replica_since)) -lt "$REPLICA_WAIT_SECONDS" ]; then
            log "no replica streams yet: waiting for one"
            return 1
        fi
        role=master port=6379
        if ! source=$(ask_sentinels); then
            log "no Sentinel answers: no backup this time"
            return 1
        fi
    fi
    name="redis-$(date -u +%Y%m%dT%H%M%SZ).rdb"
    if ! output=$(redis-cli -h "$source" -p "$port" --user "$REDIS_USER" --no-auth-warning \
        --rdb "$BACKUPS/.$name.part" 2>&1); then
        rm -f "$BACKUPS/.$name.part"
        log "backup from the $role $source failed: $output"
        return 1
    fi
    mv "$BACKUPS/.$name.part" "$BACKUPS/$name"
    log "backup $name taken from the $role $source ($(stat -c %s "$BACKUPS/$name") bytes)"
    find "$BACKUPS" -maxdepth 1 -name 'redis-*.rdb' -printf '%f\n' | sort -r | tail -n +"$((BACKUP_RETENTION + 1))" |
        while read -r old; do
            rm -f "$BACKUPS/$old"
            log "backup $old expired (keeping $BACKUP_RETENTION)"
        done
    date +%s >"$STATE/backup-succeeded"
}

case "${1:-}" in
serve)
    REDISCLI_AUTH=$(cat "$REDIS_PASSWORD_FILE")
    export REDISCLI_AUTH
    # shellcheck source=sentinels.sh
    . /usr/local/lib/transvidio/sentinels.sh
    date +%s >"$STATE/backup-started"
    trap 'exit 0' TERM INT
    next=$SECONDS
    while :; do
        if [ "$SECONDS" -ge "$next" ]; then
            if backup_once; then
                next=$((SECONDS + BACKUP_INTERVAL_MINUTES * 60))
            else
                next=$((SECONDS + 10)) # try again soon
            fi
        fi
        sleep 1 &
        wait $!
    done
    ;;
check)
    now=$(date +%s)
    allowed=$((2 * BACKUP_INTERVAL_MINUTES * 60 + 60))
    if [ -s "$STATE/backup-succeeded" ]; then
        [ $((now - $(cat "$STATE/backup-succeeded"))) -le "$allowed" ]
    else
        [ $((now - $(cat "$STATE/backup-started"))) -le "$allowed" ]
    fi
    ;;
*)
    echo "usage: redis-backup.sh serve|check" >&2
    exit 64
    ;;
esac
