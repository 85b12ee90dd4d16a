#!/usr/bin/env bash
# Healthy data node: answers PING with its password. Healthy Sentinel: knows a master.
set -euo pipefail
REDISCLI_AUTH=$(cat /etc/transvidio/secrets/redis-password)
export REDISCLI_AUTH
if [ -n "${SENTINEL_NODE:-}" ]; then
    redis-cli -p 26379 --no-auth-warning SENTINEL get-master-addr-by-name "${REDIS_MASTER_NAME:-transvidio}" | grep -q .
else
    [ "$(redis-cli -p 6379 --no-auth-warning PING)" = PONG ]
fi
