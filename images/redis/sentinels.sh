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

# One replica that streams from the master now, as "address port": flags exactly `slave`
# (not down) and its link to the master up. Fails when no Sentinel names one.
streaming_replica() {
    local entry answer
    IFS=',' read -r -a entries <<<"$REDIS_SENTINELS"
    for entry in "${entries[@]}"; do
        # Each replica is a run of name/value lines; the run starts again at `name`.
        answer=$(timeout 2 redis-cli -h "${entry%:*}" -p "${entry##*:}" --user "$REDIS_USER" --no-auth-warning \
            SENTINEL REPLICAS "$REDIS_MASTER_NAME" 2>/dev/null | awk '
                function done() { if (flags == "slave" && link == "ok" && port > 0 && !found) { print ip, port; found = 1 } }
                previous == "name" { done(); ip = ""; port = 0; flags = ""; link = "" }
                previous == "ip" { ip = $0 }
                previous == "port" { port = $0 + 0 }
                previous == "flags" { flags = $0 }
                previous == "master-link-status" { link = $0 }
                { previous = $0 }
                END { done() }') || continue
        if [ -n "$answer" ]; then
            printf '%s\n' "$answer"
            return 0
        fi
    done
    return 1
}
