#!/usr/bin/env bash
# Healthy primary: accepts connections and is not in recovery. Healthy replica: in
# recovery and streaming from the primary. Over the unix socket, by peer auth.
set -euo pipefail
if [ "${PG_ROLE:-primary}" = slots ]; then
    # The slot keeper: healthy while it has reached the primary within the last minute.
    [ -n "$(find /var/lib/postgresql/run/slots-checked -mmin -1 2>/dev/null)" ]
    exit
fi
PG_BIN=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d | sort -V | tail -n 1)
if [ "${PG_ROLE:-primary}" = replica ]; then
    query="SELECT pg_is_in_recovery() AND EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')"
else
    query="SELECT NOT pg_is_in_recovery()"
fi
state=$("$PG_BIN/psql" --no-psqlrc --host=/var/lib/postgresql/run --username=postgres --dbname=postgres \
    --tuples-only --no-align --command="$query")
[ "$state" = t ]
