#!/usr/bin/env bash
# Patroni's hooks. A node that starts as, or becomes, primary (and the first primary after
# the bootstrap) applies the stack's roles, passwords and database, then the stack's
# cluster-wide Patroni settings, so that a rotated password or a changed setting reaches a
# running cluster. Patroni calls `<action> <role> <scope>`, or `post_bootstrap <dsn>`; the
# entrypoint calls `rotate primary` when the credentials store has new passwords.
set -euo pipefail

CONF_DIR=/etc/transvidio/postgres
RUN_DIR=/var/lib/postgresql/run
PG_BIN=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d | sort -V | tail -n 1)

log() { printf '%s callback[%s]: %s\n' "$(date -u +%FT%TZ)" "${PG_NODE:-postgres}" "$*" >&2; }

apply_setup() {
    local attempt
    for attempt in 1 2 3 4 5 6 7 8 9 10; do
        if "$PG_BIN/psql" --no-psqlrc --quiet --host="$RUN_DIR" --username=postgres --dbname=postgres \
            --file="$CONF_DIR/primary-setup.sql"; then
            log "roles, passwords and database applied"
            return 0
        fi
        log "setup attempt $attempt failed; retrying"
        sleep 1
    done
    return 1
}

apply_dcs() {
    local output
    if output=$(patronictl --config-file "$RUN_DIR/patroni.yml" edit-config --force --quiet \
        --apply "$CONF_DIR/patroni-dcs.json" 2>&1); then
        log "cluster settings applied"
    else
        log "cluster settings not applied: $output"
    fi
}

case "${1:-}" in
post_bootstrap) apply_setup ;;
rotate) apply_setup ;;
on_start | on_role_change)
    if [ "${2:-}" = primary ] || [ "${2:-}" = master ]; then
        apply_setup
        apply_dcs
    fi
    ;;
*) ;;
esac
