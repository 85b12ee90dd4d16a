# shellcheck shell=bash
# Questions to the Sentinels, shared by the data nodes' entrypoint and the backup job, and
# what the entrypoints share. The questions need REDIS_SENTINELS (host:port,...),
# REDIS_MASTER_NAME, REDIS_USER, and the user's password in REDISCLI_AUTH; the sourcing script
# defines log().

# Sends `SENTINEL <args>` to each Sentinel in turn, passes its whole answer through the
# reducer (first argument: a filter from stdin to stdout) and prints the first result that
# the predicate (second argument) accepts; fails when none does.
sentinel_query() {
    local reduce=$1 accept=$2 entry answer
    shift 2
    IFS=',' read -r -a entries <<<"$REDIS_SENTINELS"
    for entry in "${entries[@]}"; do
        answer=$(timeout 2 redis-cli -h "${entry%:*}" -p "${entry##*:}" --user "$REDIS_USER" --no-auth-warning \
            SENTINEL "$@" 2>/dev/null | "$reduce") || continue
        if "$accept" "$answer"; then
            printf '%s\n' "$answer"
            return 0
        fi
    done
    return 1
}

first_line() { head -n 1; }
is_address() { [[ "$1" =~ ^[0-9a-fA-F.:]+$ ]]; }
is_set() { [ -n "$1" ]; }

# The address of the node the Sentinels call master.
ask_sentinels() { sentinel_query first_line is_address get-master-addr-by-name "$REDIS_MASTER_NAME"; }

# From SENTINEL REPLICAS: the first replica that streams from the master now, as "address
# port": flags exactly `slave` (not down) and its link to the master up. Each replica is a
# run of name/value lines; the run starts again at `name`.
first_streaming() {
    awk '
        function done() { if (flags == "slave" && link == "ok" && port > 0 && !found) { print ip, port; found = 1 } }
        previous == "name" { done(); ip = ""; port = 0; flags = ""; link = "" }
        previous == "ip" { ip = $0 }
        previous == "port" { port = $0 + 0 }
        previous == "flags" { flags = $0 }
        previous == "master-link-status" { link = $0 }
        { previous = $0 }
        END { done() }'
}

# One replica that streams from the master now; fails when no Sentinel names one.
streaming_replica() { sentinel_query first_streaming is_set replicas "$REDIS_MASTER_NAME"; }

# This container's address in the network CIDR $1 (the data network), read from the kernel's
# table of local addresses: on a swarm a task's address is known only once it runs.
own_address() {
    awk -v cidr="$1" '
        function number(address, parts) { split(address, parts, "."); return ((parts[1] * 256 + parts[2]) * 256 + parts[3]) * 256 + parts[4] }
        BEGIN { split(cidr, c, "/"); size = 2 ^ (32 - c[2]); network = number(c[1]) - number(c[1]) % size }
        /\/32 host LOCAL/ && !found && number(previous) - number(previous) % size == network { print previous; found = 1 }
        { previous = $2 }' /proc/net/fib_trie
}

# The first IPv4 address of a name (an address is its own, even where the resolver would
# refuse it: getent asks with AI_ADDRCONFIG); fails when it does not resolve.
resolve_address() {
    local address
    if [[ "$1" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
        printf '%s\n' "$1"
        return 0
    fi
    address=$(getent ahostsv4 "$1" | awk 'NR == 1 { print $1 }') && [ -n "$address" ] && printf '%s\n' "$address"
}

# log(), at most once every 30 s, for a wait that goes on.
next_notice=0
notice() {
    if [ "$SECONDS" -ge "$next_notice" ]; then
        log "$*"
        next_notice=$((SECONDS + 30))
    fi
}
