#!/usr/bin/env bash
# Healthy data node: answers PING as its own user. Healthy Sentinel: knows a master (an
# address, or on a swarm a name; not an error reply: redis-cli exits 0 on those too).
set -euo pipefail
REDISCLI_AUTH=$(cat "$REDIS_PASSWORD_FILE")
export REDISCLI_AUTH
if [ -n "${SENTINEL_NODE:-}" ]; then
    answer=$(redis-cli -p 26379 --user "$REDIS_USER" --no-auth-warning \
        SENTINEL get-master-addr-by-name "${REDIS_MASTER_NAME:-transvidio}")
    [[ "${answer%%$'\n'*}" =~ ^[0-9A-Za-z][0-9A-Za-z.:-]*$ ]]
else
    [ "$(redis-cli -p 6379 --user "$REDIS_USER" --no-auth-warning PING)" = PONG ]
fi
