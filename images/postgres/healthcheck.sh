#!/usr/bin/env bash
# Healthy PostgreSQL node: the primary, or a replica that streams from it (whichever role
# Patroni gave it). Healthy etcd member: answers, and its cluster has a leader.
set -euo pipefail
if [ "${PG_ROLE:-node}" = etcd ]; then
    exec etcdctl --endpoints=http://127.0.0.1:2379 --command-timeout=3s endpoint health
fi
PG_BIN=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d | sort -V | tail -n 1)
query="SELECT NOT pg_is_in_recovery() OR EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')"
state=$("$PG_BIN/psql" --no-psqlrc --host=/var/lib/postgresql/run --username=postgres --dbname=postgres \
    --tuples-only --no-align --command="$query")
[ "$state" = t ]
