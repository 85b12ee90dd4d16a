#!/usr/bin/env bash
# The Redis group's backups.
#   serve  every BACKUP_INTERVAL_MINUTES, copy the master's data set into /backups as
#          redis-<UTC time>.rdb (an RDB made for this copy by Redis's replication protocol:
#          `redis-cli --rdb`, as the replica user), and keep the newest BACKUP_RETENTION;
#   check  healthy while the last attempt succeeded within two intervals (or the first is
#          still due).
# The master is whichever node the Sentinels name now: after a failover, the new one.
set -euo pipefail

: "${REDIS_SENTINELS:?REDIS_SENTINELS lists host:port of every Sentinel}"
: "${REDIS_USER:?REDIS_USER names the user the copy is made as}"
: "${REDIS_PASSWORD_FILE:?REDIS_PASSWORD_FILE holds the password of that user}"
: "${BACKUP_INTERVAL_MINUTES:?BACKUP_INTERVAL_MINUTES is the time between two backups}"
: "${BACKUP_RETENTION:?BACKUP_RETENTION is how many backups are kept}"
: "${REDIS_MASTER_NAME:=transvidio}"
BACKUPS=/backups
STATE=/var/lib/redis/run

log() { printf '%s redis-backup: %s\n' "$(date -u +%FT%TZ)" "$*" >&2; }

backup_once() {
    local master name
    if ! master=$(ask_sentinels); then
        log "no Sentinel answers: no backup this time"
        return 1
    fi
    name="redis-$(date -u +%Y%m%dT%H%M%SZ).rdb"
    if ! output=$(redis-cli -h "$master" -p 6379 --user "$REDIS_USER" --no-auth-warning --rdb "$BACKUPS/.$name.part" 2>&1); then
        rm -f "$BACKUPS/.$name.part"
        log "backup from $master failed: $output"
        return 1
    fi
    mv "$BACKUPS/.$name.part" "$BACKUPS/$name"
    log "backup $name taken from $master ($(stat -c %s "$BACKUPS/$name") bytes)"
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
