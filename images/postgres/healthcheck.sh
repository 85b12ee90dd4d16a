#!/usr/bin/env bash
# Healthy primary: accepts TCP connections. Healthy replica: in recovery and streaming.
set -euo pipefail
PG_BIN=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d | sort -V | tail -n 1)
"$PG_BIN/pg_isready" --quiet --host=127.0.0.1 --port=5432
if [ "${PG_ROLE:-primary}" = replica ]; then
    state=$("$PG_BIN/psql" --no-psqlrc --host=/var/lib/postgresql/run --username=postgres --dbname=postgres \
        --tuples-only --no-align --command="SELECT pg_is_in_recovery() AND EXISTS (
            SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')")
    [ "$state" = t ]
fi
