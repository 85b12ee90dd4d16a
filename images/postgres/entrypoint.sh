#!/usr/bin/env bash
# Starts a PostgreSQL primary or streaming replica (PG_ROLE=primary|replica), or the
# slot keeper (PG_ROLE=slots) that drops the slots of replicas the stack no longer has.
# Config comes from the stack's uploads in /etc/transvidio/postgres, secrets from
# files in /etc/transvidio/secrets. Every step is safe to repeat on a restart.
#
# The primary also owns the backups: it archives every WAL segment to the pgBackRest
# repository (archive_command), takes full and incremental backups on schedule, and,
# started on an empty volume with RESTORE_TARGET set, restores from the repository
# instead of initialising. An empty volume next to a repository that holds backups is
# never initialised silently: that would start an empty database over lost data.
set -euo pipefail

CONF_DIR=/etc/transvidio/postgres
SECRETS_DIR=/etc/transvidio/secrets
RUN_DIR=/var/lib/postgresql/run
: "${PGDATA:=/var/lib/postgresql/data}"
: "${PG_ROLE:?PG_ROLE must be primary or replica}"
: "${PG_NODE:?PG_NODE names this node (its config is $CONF_DIR/\$PG_NODE.conf)}"

# Debian installs one major version under /usr/lib/postgresql/<major>/bin; find it.
PG_BIN=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d | sort -V | tail -n 1)
export PATH="$PG_BIN:$PATH"
export PGHOST="$RUN_DIR"

log() { printf '%s entrypoint[%s]: %s\n' "$(date -u +%FT%TZ)" "$PG_NODE" "$*" >&2; }

server_options=(-c "config_file=$CONF_DIR/$PG_NODE.conf")
# pg_ctl's start waits this long: a restore may replay a lot of WAL before it is ready.
export PGCTLTIMEOUT=${PGCTLTIMEOUT:-3600}

init_primary() {
    log "initialising a new cluster in $PGDATA"
    initdb --pgdata="$PGDATA" --username=postgres --pwfile="$SECRETS_DIR/postgres-password" \
        --auth-local=peer --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 --data-checksums >/dev/null
}

run_setup() {
    # Roles and database on every start, over the unix socket only: nothing can
    # connect over the network (and the TCP healthcheck fails) until this is done.
    # A socket directory of its own: the healthcheck (which uses the usual one) fails meanwhile.
    local setup_socket=/var/lib/postgresql/setup
    mkdir -p "$setup_socket"
    # hot_standby off: after a restore, the server answers only once recovery has ended
    # and it is promoted, so the setup never meets a read-only server. pg_ctl's wait ends
    # as soon as recovery starts; waiting for connections is what waits for its end.
    pg_ctl --pgdata="$PGDATA" --wait --silent \
        -o "-c config_file=$CONF_DIR/$PG_NODE.conf -c listen_addresses='' -c unix_socket_directories=$setup_socket -c hot_standby=off" start
    until pg_isready --quiet --host="$setup_socket"; do
        if ! pg_ctl --pgdata="$PGDATA" status >/dev/null; then
            log "postgres stopped before it accepted connections (its log is above)"
            exit 1
        fi
        sleep 1
    done
    psql --no-psqlrc --quiet --host="$setup_socket" --username=postgres --dbname=postgres \
        --file="$CONF_DIR/primary-setup.sql"
    pg_ctl --pgdata="$PGDATA" --wait --silent --mode=fast stop
}

write_passfile() {
    # libpq reads the replication password from here (primary_conninfo passfile=).
    local password
    password=$(cat "$SECRETS_DIR/replication-password")
    umask 077
    printf '%s:%s:*:%s:%s\n' "$PRIMARY_HOST" 5432 "${REPLICATION_USER:-replicator}" "$password" >"$RUN_DIR/pgpass"
    printf '%s:%s:replication:%s:%s\n' "$PRIMARY_HOST" 5432 "${REPLICATION_USER:-replicator}" "$password" >>"$RUN_DIR/pgpass"
    export PGPASSFILE="$RUN_DIR/pgpass"
}

repository_has_backups() {
    pgbackrest info --output=json 2>/dev/null | jq -e '(.[0].backup // []) | length > 0' >/dev/null
}

restore_primary() {
    if ! repository_has_backups; then
        log "RESTORE_TARGET=$RESTORE_TARGET, but the backup repository $PGBACKREST_STANZA has no backup to restore"
        exit 66
    fi
    local target=(--type=default)
    if [ "$RESTORE_TARGET" != latest ]; then
        target=(--type=time "--target=$RESTORE_TARGET" --target-action=promote)
    fi
    log "restoring from the backup repository to $RESTORE_TARGET"
    pgbackrest restore "${target[@]}" 2>&1 | tail -n 5 >&2
}

backup_schedule() {
    # Runs beside the server, never stops it: a failed step is logged and tried again.
    set +e
    local info now last_full last_any kind output
    until pg_isready --quiet --host="$RUN_DIR"; do sleep 1; done
    until output=$(pgbackrest stanza-create 2>&1); do
        log "backup repository not ready: ${output##*ERROR: }"
        sleep 10
    done
    while true; do
        info=$(pgbackrest info --output=json 2>/dev/null)
        now=$(date +%s)
        last_full=$(jq '[.[0].backup[]? | select(.type == "full") | .timestamp.stop] | max // 0' <<<"$info")
        last_any=$(jq '[.[0].backup[]? | .timestamp.stop] | max // 0' <<<"$info")
        kind=
        if ((now - ${last_full:-0} >= BACKUP_FULL_INTERVAL_MINUTES * 60)); then
            kind=full
        elif ((BACKUP_INCREMENTAL_INTERVAL_MINUTES > 0 && now - ${last_any:-0} >= BACKUP_INCREMENTAL_INTERVAL_MINUTES * 60)); then
            kind=incr
        fi
        if [ -n "$kind" ]; then
            log "taking a $kind backup"
            if output=$(pgbackrest backup --type="$kind" 2>&1); then
                log "$kind backup done: $(pgbackrest info --output=json | jq -r '.[0].backup[-1].label')"
            else
                log "$kind backup failed: ${output##*ERROR: }"
            fi
        fi
        touch "$RUN_DIR/backup-checked"
        sleep "${BACKUP_CHECK_SECONDS:-10}"
    done
}

supervise_primary() {
    # This shell stays PID 1 so the scheduler is its child, not the postmaster's (which
    # would take any unknown child's exit for a crashed backend). A stop signal goes to
    # the server; the container ends with the server's exit status.
    postgres -D "$PGDATA" "${server_options[@]}" &
    local server=$! scheduler status
    trap 'kill -INT "$server" 2>/dev/null' INT
    trap 'kill -TERM "$server" 2>/dev/null' TERM
    backup_schedule &
    scheduler=$!
    set +e
    while true; do
        wait "$server"
        status=$?
        kill -0 "$server" 2>/dev/null || break # else a trapped signal ended the wait
    done
    kill "$scheduler" 2>/dev/null
    log "postgres exited with status $status"
    exit "$status"
}

bootstrap_replica() {
    local slot=$1
    local primary=(--host="$PRIMARY_HOST" --port=5432 --username="${REPLICATION_USER:-replicator}" --no-password)
    log "waiting for the primary $PRIMARY_HOST"
    until pg_isready --quiet "${primary[@]:0:3}"; do sleep 1; done
    # A fresh base backup does not need what an old slot of ours kept (a wiped
    # volume, an invalidated slot): drop it if present, then create it anew.
    pg_receivewal "${primary[@]}" --slot="$slot" --drop-slot 2>/dev/null || true
    pg_receivewal "${primary[@]}" --slot="$slot" --create-slot --if-not-exists
    log "taking a base backup through slot $slot"
    find "$PGDATA" -mindepth 1 -delete
    pg_basebackup "${primary[@]}" --pgdata="$PGDATA" --wal-method=stream --slot="$slot" \
        --checkpoint=fast --progress --verbose 2>&1 | tail -n 3 >&2
}

keep_slots() {
    # A removed replica's slot pins WAL on the primary up to max_slot_wal_keep_size. Its
    # container is stopped last in an apply (deletes come after creates), so try until the
    # slot is inactive; an active slot is refused by the primary and never dropped. Once
    # every stale slot is dropped or absent, only the primary's liveness is checked (each
    # replication command is a line in the primary's log).
    local primary=(--host="$PRIMARY_HOST" --port=5432 --username="${REPLICATION_USER:-replicator}" --no-password)
    local slot output pending=() left
    IFS=',' read -r -a pending <<<"${PG_STALE_SLOTS:-}"
    trap 'exit 0' INT TERM
    while true; do
        if pg_isready --quiet "${primary[@]:0:3}"; then
            left=()
            for slot in "${pending[@]}"; do
                if output=$(pg_receivewal "${primary[@]}" --slot="$slot" --drop-slot 2>&1); then
                    log "dropped slot $slot: the stack no longer has its replica"
                elif [[ $output != *"does not exist"* ]]; then
                    log "slot $slot not dropped yet: ${output##*ERROR: }"
                    left+=("$slot")
                fi
            done
            pending=("${left[@]}")
            touch "$RUN_DIR/slots-checked"
        fi
        sleep "${SLOT_CHECK_SECONDS:-10}" &
        wait $!
    done
}

case "$PG_ROLE" in
slots)
    : "${PRIMARY_HOST:?PRIMARY_HOST names the primary}"
    write_passfile
    log "keeping slots: dropping ${PG_STALE_SLOTS:-nothing} when inactive"
    keep_slots
    ;;
primary)
    : "${PGBACKREST_STANZA:?PGBACKREST_STANZA names the stanza of the backup repository}"
    : "${BACKUP_FULL_INTERVAL_MINUTES:?BACKUP_FULL_INTERVAL_MINUTES is the full backup interval}"
    : "${BACKUP_INCREMENTAL_INTERVAL_MINUTES:?BACKUP_INCREMENTAL_INTERVAL_MINUTES is the incremental interval (0: none)}"
    if [ -s "$PGDATA/PG_VERSION" ]; then
        [ -z "${RESTORE_TARGET:-}" ] || log "data present: RESTORE_TARGET=$RESTORE_TARGET is for an empty volume only"
    elif [ -n "${RESTORE_TARGET:-}" ]; then
        restore_primary
    elif repository_has_backups; then
        log "the data volume is empty but the backup repository holds backups of this stack: not initialising" \
            "an empty database over them. Restore with \`pulumi config set --path postgres.restoreTarget latest\`" \
            "(or a time) and \`pulumi up\`; or remove the backup volume to start anew."
        exit 65
    else
        init_primary
    fi
    run_setup
    log "starting postgres as primary, with backups every ${BACKUP_FULL_INTERVAL_MINUTES}m (full)" \
        "and ${BACKUP_INCREMENTAL_INTERVAL_MINUTES}m (incremental)"
    supervise_primary
    ;;
replica)
    : "${PRIMARY_HOST:?PRIMARY_HOST names the primary}"
    : "${PG_SLOT:?PG_SLOT names the replication slot of this replica}"
    write_passfile
    if [ ! -s "$PGDATA/PG_VERSION" ]; then
        bootstrap_replica "$PG_SLOT"
    else
        log "data present: resuming streaming through slot $PG_SLOT"
    fi
    touch "$PGDATA/standby.signal"
    ;;
*)
    log "PG_ROLE=$PG_ROLE: must be primary or replica"
    exit 64
    ;;
esac

log "starting postgres as $PG_ROLE"
exec postgres -D "$PGDATA" "${server_options[@]}"
