#!/usr/bin/env bash
# Starts one member of the PostgreSQL tier (PG_ROLE):
#   etcd  a member of the consensus store that holds Patroni's leader lock;
#   node  a PostgreSQL node under Patroni. Patroni decides its role: the first node
#         bootstraps the cluster (patroni-bootstrap.sh), the others clone it; when the
#         primary is lost a replica is promoted, and an old primary that comes back
#         rejoins as a replica (pg_rewind, or a fresh clone when it cannot be rewound).
# Beside Patroni run the backup schedule (whichever node is primary archives every WAL
# segment and takes pgBackRest's full and incremental backups) and leader-fence.sh, which
# ends a lost primary's lock after FAILOVER_DETECT_SECONDS rather than Patroni's TTL.
# Config comes from the stack's uploads in /etc/transvidio/postgres, secrets from files
# in /etc/transvidio/secrets: the tier's credentials store, which its writer replaces when
# a password is rotated; this node then applies the new ones without restarting. Every
# step is safe to repeat on a restart.
set -euo pipefail

CONF_DIR=/etc/transvidio/postgres
SECRETS_DIR=/etc/transvidio/secrets
RUN_DIR=/var/lib/postgresql/run
: "${PG_ROLE:?PG_ROLE must be node or etcd}"
: "${PG_NODE:?PG_NODE names this node (its config is $CONF_DIR/\$PG_NODE.*)}"

log() { printf '%s entrypoint[%s]: %s\n' "$(date -u +%FT%TZ)" "$PG_NODE" "$*" >&2; }

if [ "$PG_ROLE" = etcd ]; then
    log "starting etcd"
    exec etcd --config-file "$CONF_DIR/$PG_NODE.etcd.yml"
fi
if [ "$PG_ROLE" != node ]; then
    log "PG_ROLE=$PG_ROLE: must be node or etcd"
    exit 64
fi
: "${BACKUP_FULL_INTERVAL_MINUTES:?BACKUP_FULL_INTERVAL_MINUTES is the full backup interval}"
: "${BACKUP_INCREMENTAL_INTERVAL_MINUTES:?BACKUP_INCREMENTAL_INTERVAL_MINUTES is the incremental interval (0: none)}"
: "${FAILOVER_DETECT_SECONDS:?FAILOVER_DETECT_SECONDS is how long a silent primary keeps its lock (0: its TTL)}"

# Debian installs one major version under /usr/lib/postgresql/<major>/bin; find it.
PG_BIN=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d | sort -V | tail -n 1)
export PATH="$PG_BIN:$PATH"
export PGHOST="$RUN_DIR"

write_patroni_config() {
    # The stack's config plus what it must not carry: passwords (from the secret files,
    # into a file only this user reads) and the installed server's directory.
    python3 - "$CONF_DIR/$PG_NODE.patroni.yml" "$RUN_DIR/patroni.yml" "$PG_BIN" "$SECRETS_DIR" <<'PY'
import os
import sys

import yaml

source, target, bin_dir, secrets = sys.argv[1:]


def secret(name: str) -> str:
    with open(os.path.join(secrets, name)) as handle:
        return handle.read().strip()


with open(source) as handle:
    config = yaml.safe_load(handle)
config["postgresql"]["bin_dir"] = bin_dir
users = config["postgresql"]["authentication"]
users["superuser"]["password"] = secret("postgres-password")
users["replication"]["password"] = secret("replication-password")
users["rewind"]["password"] = secret("rewind-password")
config["restapi"]["authentication"]["password"] = secret("patroni-api-password")
with open(os.open(target + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
    yaml.safe_dump(config, handle, sort_keys=True)
os.replace(target + ".new", target)
PY
}

clear_unfinished_initialize() {
    # After a failed bootstrap Patroni removes its initialize key, but only if etcd answers
    # at that moment; a key left with the empty value ("being bootstrapped") would make
    # every later start wait for that bootstrap forever. Only an empty one is removed: the
    # system id of a cluster that was initialised is never touched.
    local key="$DCS_PREFIX/initialize"
    if printf 'value("%s") = ""\n\ndel %s\n\n\n' "$key" "$key" | etcdctl --endpoints="$DCS_ENDPOINTS" txn >/dev/null 2>&1; then
        log "no unfinished initialize key left in etcd"
    else
        log "etcd did not answer: an unfinished initialize key may be left"
    fi
}

is_primary() {
    [ "$(psql --no-psqlrc --username=postgres --dbname=postgres -Atqc 'SELECT NOT pg_is_in_recovery()' 2>/dev/null)" = t ]
}

watch_credentials() {
    # A rotated password arrives as new files in the store, with a new .generation. The
    # primary gives the roles their new passwords at once; every node then rewrites
    # Patroni's config and reloads it (a replica a few seconds later, so that the primary
    # has applied them before the replica's next connection uses them).
    set +e
    local seen current
    seen=$(cat "$SECRETS_DIR/.generation" 2>/dev/null)
    while true; do
        sleep "${CREDENTIALS_CHECK_SECONDS:-2}"
        current=$(cat "$SECRETS_DIR/.generation" 2>/dev/null)
        if [ -z "$current" ] || [ "$current" = "$seen" ]; then
            continue
        fi
        if is_primary; then
            /usr/local/bin/patroni-callback.sh rotate primary || continue
        else
            sleep "${CREDENTIALS_FOLLOW_SECONDS:-4}"
        fi
        if write_patroni_config && kill -HUP "$patroni"; then
            # While its WAL receiver streams, Patroni keeps the old password in its pgpass
            # (it compares the live connection, which hides the password); the next
            # reconnect would fail once. This line serves any host until Patroni writes
            # its own again.
            (umask 077 && printf '*:*:*:replicator:%s\n' "$(cat "$SECRETS_DIR/replication-password")" \
                >"$RUN_DIR/patroni-pgpass")
            seen=$current
            log "credentials of generation $current applied; Patroni reloaded"
        fi
    done
}

backup_schedule() {
    # Runs beside Patroni, never stops it: a failed step is logged and tried again. Only
    # the primary backs up; after a failover the new primary takes over the schedule.
    set +e
    local info now last_full last_any kind output stanza_ready=""
    while true; do
        if is_primary; then
            if [ -z "$stanza_ready" ]; then
                if output=$(pgbackrest stanza-create 2>&1); then
                    stanza_ready=yes
                else
                    log "backup repository not ready: ${output##*ERROR: }"
                fi
            fi
        else
            stanza_ready=""
        fi
        if [ -n "$stanza_ready" ]; then
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
        fi
        touch "$RUN_DIR/backup-checked"
        sleep "${BACKUP_CHECK_SECONDS:-10}"
    done
}

write_patroni_config
# Where Patroni keeps this cluster's keys: etcd's client URLs, and the cluster's key prefix.
read -r DCS_ENDPOINTS DCS_PREFIX < <(python3 - "$RUN_DIR/patroni.yml" <<'PY'
import sys

import yaml

config = yaml.safe_load(open(sys.argv[1]))
hosts = ",".join("http://" + host for host in config["etcd3"]["hosts"])
print(hosts, config["namespace"].rstrip("/") + "/" + config["scope"])
PY
)
rm -f "$RUN_DIR/bootstrap-refused"
# This shell stays PID 1 so the scheduler is its child, not Patroni's. A stop signal goes
# to Patroni, which stops PostgreSQL cleanly and hands the leader lock over at once
# rather than after its TTL; the container ends with Patroni's exit status.
log "starting Patroni; backups every ${BACKUP_FULL_INTERVAL_MINUTES}m (full) and" \
    "${BACKUP_INCREMENTAL_INTERVAL_MINUTES}m (incremental) while this node is primary"
patroni "$RUN_DIR/patroni.yml" &
patroni=$!
trap 'kill -TERM "$patroni" 2>/dev/null' INT TERM
backup_schedule &
scheduler=$!
watch_credentials &
watcher=$!
/usr/local/bin/leader-fence.sh "$DCS_ENDPOINTS" "$DCS_PREFIX" &
fence=$!
set +e
while true; do
    wait "$patroni"
    status=$?
    kill -0 "$patroni" 2>/dev/null || break # else a trapped signal ended the wait
done
kill "$scheduler" "$watcher" "$fence" 2>/dev/null
log "Patroni exited with status $status"
if [ -s "$RUN_DIR/bootstrap-refused" ]; then
    clear_unfinished_initialize
    log "bootstrap refused: $(tail -n +2 "$RUN_DIR/bootstrap-refused")"
    exit "$(head -n 1 "$RUN_DIR/bootstrap-refused")"
fi
exit "$status"
