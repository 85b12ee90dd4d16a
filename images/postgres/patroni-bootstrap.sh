#!/usr/bin/env bash
# Patroni's bootstrap of a new cluster (run by the one node that takes the init lock):
#   fresh    initdb; refused when the backup repository holds backups of this stack, since
#            an empty database would then start over data that can be restored;
#   restore TARGET  pgBackRest restores the newest backup taken before TARGET (latest, or
#            a time); Patroni then replays the archive up to the target and promotes.
# A refusal leaves its exit status and reason in $RUN_DIR/bootstrap-refused: Patroni itself
# only says that the bootstrap failed; the entrypoint repeats the reason last and ends the
# container with that status.
set -euo pipefail

SECRETS_DIR=/etc/transvidio/secrets
: "${PGDATA:=/var/lib/postgresql/data}"
RUN_DIR=/var/lib/postgresql/run
: "${PG_NODE:=postgres}"

log() { printf '%s bootstrap[%s]: %s\n' "$(date -u +%FT%TZ)" "$PG_NODE" "$*" >&2; }

refuse() {
    local status=$1
    shift
    log "$@"
    printf '%s\n%s\n' "$status" "$*" >"$RUN_DIR/bootstrap-refused"
    exit "$status"
}

repository_has_backups() {
    pgbackrest info --output=json 2>/dev/null | jq -e '(.[0].backup // []) | length > 0' >/dev/null
}

case "${1:-}" in
fresh)
    if repository_has_backups; then
        refuse 65 "the backup repository holds backups of this stack: not initialising an empty database" \
            "over them. Restore with \`pulumi config set --path postgres.restoreTarget latest\` (or a time)" \
            "and \`pulumi up\`; or remove the backup volume to start anew."
    fi
    log "initialising a new cluster in $PGDATA"
    initdb --pgdata="$PGDATA" --username=postgres --pwfile="$SECRETS_DIR/postgres-password" \
        --auth-local=peer --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 --data-checksums >/dev/null
    ;;
restore)
    target=${2:?restore needs a target: latest, or a time}
    if ! repository_has_backups; then
        refuse 66 "restoreTarget is set, but the backup repository has no backup to restore"
    fi
    log "restoring from the repository to $target; Patroni replays the archive and promotes"
    if [ "$target" = latest ]; then
        pgbackrest restore --type=default 2>&1 | tail -n 5 >&2
    else
        pgbackrest restore --type=time "--target=$target" 2>&1 | tail -n 5 >&2
    fi
    # Patroni writes the recovery settings; pgBackRest's copies in postgresql.auto.conf
    # would outlive this restore (and a target there would stop a future standby's replay).
    sed -i -E '/^(restore_command|recovery_target[a-z_]*) *=/d' "$PGDATA/postgresql.auto.conf"
    ;;
*)
    log "usage: $0 fresh|restore"
    exit 64
    ;;
esac
