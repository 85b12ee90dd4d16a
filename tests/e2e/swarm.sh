#!/usr/bin/env bash
# A Docker Swarm of several nodes on one machine, for the swarm end-to-end suite.
#   swarm.sh install   install what it needs (Debian's docker.io, docker-registry, iproute2)
#   swarm.sh up        start it: every node a dockerd in its own network namespace, all managers
#   swarm.sh down      remove everything `up` made: daemons (by PID), registry, namespaces, links
#   swarm.sh env       print the variables the tests read (SWARM_HOSTS, SWARM_REGISTRY)
#   swarm.sh link NODE up|down   connect or cut a node's link to the others (a node lost)
# Privileged containers are refused here (no Docker-in-Docker), so a node is a dockerd in a
# network namespace: a veth pair to a host bridge, its own data-root, exec-root, socket and
# pidfile. `nsenter --net`, not `ip netns exec`, which remounts /sys and leaves dockerd
# without its devices cgroup. Images reach the nodes through a registry on the bridge
# (Debian's docker-registry), marked insecure in every node's daemon.
set -euo pipefail

SWARM_DIR=${SWARM_DIR:-/tmp/transvidio-swarm}
SWARM_NODES=${SWARM_NODES:-3}
BRIDGE=${SWARM_BRIDGE:-tvswarm0}
PREFIX=${SWARM_PREFIX:-10.247.0}
HOST_ADDRESS=$PREFIX.1
REGISTRY=$HOST_ADDRESS:5000

# shellcheck source=pids.sh
. "$(dirname "$0")/pids.sh"

log() { printf 'swarm: %s\n' "$*" >&2; }

node_name() { echo "n$1"; }
node_address() { echo "$PREFIX.$((10 + $1))"; }
node_dir() { echo "$SWARM_DIR/$(node_name "$1")"; }
node_netns() { echo "tvswarm-$(node_name "$1")"; }
node_docker() {
    local index=$1
    shift
    DOCKER_HOST="unix://$(node_dir "$index")/docker.sock" docker "$@"
}

install() {
    local missing=() tool
    for tool in dockerd docker docker-registry ip nsenter iptables; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        log "missing ${missing[*]}: run as root, or install docker.io, docker-registry, iproute2 and iptables"
        exit 1
    fi
    log "installing docker.io docker-registry iproute2 iptables"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        docker.io docker-registry iproute2 iptables util-linux >/dev/null
}

wait_until() {
    local what=$1 tries=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        tries=$((tries - 1))
        if [ "$tries" -le 0 ]; then
            log "gave up waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

# The host side: a bridge with the host's address, forwarding and NAT so that the nodes
# reach Debian's mirror for their builds (dockerd leaves FORWARD's policy at DROP).
host_network() {
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$HOST_ADDRESS/24" dev "$BRIDGE"
        ip link set "$BRIDGE" up
    fi
    echo 1 >/proc/sys/net/ipv4/ip_forward
    iptables -C FORWARD -i "$BRIDGE" -j ACCEPT 2>/dev/null || iptables -I FORWARD -i "$BRIDGE" -j ACCEPT
    iptables -C FORWARD -o "$BRIDGE" -j ACCEPT 2>/dev/null || iptables -I FORWARD -o "$BRIDGE" -j ACCEPT
    iptables -t nat -C POSTROUTING -s "$PREFIX.0/24" ! -o "$BRIDGE" -j MASQUERADE 2>/dev/null ||
        iptables -t nat -A POSTROUTING -s "$PREFIX.0/24" ! -o "$BRIDGE" -j MASQUERADE
}

node_network() {
    local index=$1 netns veth
    netns=$(node_netns "$index")
    veth="tvsw$(node_name "$index")"
    [ -e "/var/run/netns/$netns" ] && return 0
    ip netns add "$netns"
    ip link add "$veth" type veth peer name eth0 netns "$netns"
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$netns" link set lo up
    ip -n "$netns" addr add "$(node_address "$index")/24" dev eth0
    ip -n "$netns" link set eth0 up
    ip -n "$netns" route add default via "$HOST_ADDRESS"
}

start_registry() {
    local dir=$SWARM_DIR/registry
    alive "$dir/registry.pid" && return 0
    mkdir -p "$dir/storage"
    cat >"$dir/config.yml" <<CONF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
http:
  addr: $REGISTRY
CONF
    nohup docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
    echo $! >"$dir/registry.pid"
    wait_until "the registry on $REGISTRY" 150 bash -c "exec 3<>/dev/tcp/${REGISTRY%:*}/${REGISTRY#*:}"
}

start_node() {
    local index=$1 dir
    dir=$(node_dir "$index")
    alive "$dir/dockerd.pid" && return 0
    mkdir -p "$dir"
    rm -f "$dir/docker.sock"
    nohup nsenter --net="/var/run/netns/$(node_netns "$index")" dockerd \
        --data-root "$dir/root" --exec-root "$dir/exec" -H "unix://$dir/docker.sock" \
        --pidfile "$dir/dockerd.pid" --insecure-registry "$REGISTRY" >"$dir/dockerd.log" 2>&1 &
    wait_until "the dockerd of $(node_name "$index")" 300 node_docker "$index" version || {
        tail -20 "$dir/dockerd.log" >&2
        exit 1
    }
}

form_swarm() {
    local index token
    if [ "$(node_docker 1 info --format '{{.Swarm.LocalNodeState}}')" != active ]; then
        node_docker 1 swarm init --advertise-addr "$(node_address 1)" >/dev/null
    fi
    token=$(node_docker 1 swarm join-token -q manager)
    for index in $(seq 2 "$SWARM_NODES"); do
        if [ "$(node_docker "$index" info --format '{{.Swarm.LocalNodeState}}')" != active ]; then
            node_docker "$index" swarm join --advertise-addr "$(node_address "$index")" \
                --token "$token" "$(node_address 1):2377" >/dev/null
        fi
    done
    # Each node labelled with its name: the stack's placement constraints name nodes by it.
    for index in $(seq 1 "$SWARM_NODES"); do
        local id
        id=$(node_docker "$index" info --format '{{.Swarm.NodeID}}')
        node_docker 1 node update --label-add "transvidio.node=$(node_name "$index")" "$id" >/dev/null
    done
    wait_until "every node ready" 300 all_ready
}

all_ready() {
    [ "$(node_docker 1 node ls --format '{{.Status}} {{.Availability}}' | grep -c '^Ready Active$')" -eq "$SWARM_NODES" ]
}

up() {
    if [ "$(id -u)" -ne 0 ]; then
        log "needs root (network namespaces, a bridge, dockerd)"
        exit 1
    fi
    mkdir -p "$SWARM_DIR"
    host_network
    start_registry
    local index
    for index in $(seq 1 "$SWARM_NODES"); do
        node_network "$index"
        start_node "$index"
    done
    form_swarm
    log "up: $SWARM_NODES nodes, registry $REGISTRY"
}

down() {
    local index netns
    for index in $(seq 1 "$SWARM_NODES"); do
        stop_pid "$(node_dir "$index")/dockerd.pid"
    done
    stop_pid "$SWARM_DIR/registry/registry.pid"
    for index in $(seq 1 "$SWARM_NODES"); do
        netns=$(node_netns "$index")
        ip netns delete "$netns" 2>/dev/null || true # its end of the veth pair goes with it
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link delete "$BRIDGE"
    fi
    iptables -D FORWARD -i "$BRIDGE" -j ACCEPT 2>/dev/null || true
    iptables -D FORWARD -o "$BRIDGE" -j ACCEPT 2>/dev/null || true
    iptables -t nat -D POSTROUTING -s "$PREFIX.0/24" ! -o "$BRIDGE" -j MASQUERADE 2>/dev/null || true
    # Mounts a killed dockerd may have left behind, then the files.
    grep -o " $SWARM_DIR/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf "$SWARM_DIR"
    log "down"
}

link() {
    local name=$1 state=$2
    case "$state" in up | down) ;; *)
        log "link $name $state: the state is up or down"
        exit 2
        ;;
    esac
    ip link set "tvsw$name" "$state"
}

print_env() {
    local index hosts=()
    for index in $(seq 1 "$SWARM_NODES"); do
        hosts+=("$(node_name "$index")=unix://$(node_dir "$index")/docker.sock")
    done
    echo "SWARM_HOSTS='${hosts[*]}'"
    echo "SWARM_REGISTRY=$REGISTRY"
}

case "${1:-}" in
install) install ;;
up) up ;;
down) down ;;
env) print_env ;;
link) link "${2:?usage: swarm.sh link NODE up|down}" "${3:?usage: swarm.sh link NODE up|down}" ;;
*)
    echo "usage: swarm.sh install|up|down|env|link NODE up|down" >&2
    exit 2
    ;;
esac
