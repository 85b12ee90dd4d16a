#!/usr/bin/env bash
# Healthy PostgreSQL node: the primary, or a replica that streams from it (whichever role
# Patroni gave it). Healthy etcd member: answers, and its cluster has a leader; with
# `serving` (on a swarm), its peer port answers: a swarm resolves a task's name only once it
# is healthy, so a member waiting for its peers' names must be healthy before it has a leader
# (and etcd serves clients only once it has one).
set -euo pipefail
if [ "${PG_ROLE:-node}" = etcd ] && [ "${1:-}" = serving ]; then
    exec 3<>/dev/tcp/127.0.0.1/2380
    printf 'GET /version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3
    read -r -t 3 status <&3
    [[ "$status" == *" 200 "* ]]
    exit
fi
if [ "${PG_ROLE:-node}" = etcd ]; then
    exec etcdctl --endpoints=http://127.0.0.1:2379 --command-timeout=3s endpoint health
fi
# The image installs one major version; a glob, not find | sort: this runs every few seconds.
bins=(/usr/lib/postgresql/*/bin)
PG_BIN=${bins[-1]}
query="SELECT NOT pg_is_in_recovery() OR EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')"
state=$("$PG_BIN/psql" --no-psqlrc --host=/var/lib/postgresql/run --username=postgres --dbname=postgres \
    --tuples-only --no-align --command="$query")
[ "$state" = t ]
