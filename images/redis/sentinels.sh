# shellcheck shell=bash
# Questions to the Sentinels, shared by the data nodes' entrypoint and the backup job.
# Needs REDIS_SENTINELS (host:port,...), REDIS_MASTER_NAME, REDIS_USER, and the user's
# password in REDISCLI_AUTH.

# Sends `SENTINEL <args>` to each Sentinel in turn and prints the first answer that the
# predicate (first argument) accepts; fails when none does.
sentinel_query() {
    local accept=$1 entry answer
    shift
    IFS=',' read -r -a entries <<<"$REDIS_SENTINELS"
    for entry in "${entries[@]}"; do
        answer=$(timeout 2 redis-cli -h "${entry%:*}" -p "${entry##*:}" --user "$REDIS_USER" --no-auth-warning \
            SENTINEL "$@" 2>/dev/null | head -n 1) || continue
        if "$accept" "$answer"; then
            printf '%s\n' "$answer"
            return 0
        fi
    done
    return 1
}

is_address() { [[ "$1" =~ ^[0-9a-fA-F.:]+$ ]]; }

# The address of the node the Sentinels call master.
ask_sentinels() { sentinel_query is_address get-master-addr-by-name "$REDIS_MASTER_NAME"; }
