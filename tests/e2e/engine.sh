#!/usr/bin/env bash
# Prepares a Docker-API container engine for the end-to-end tests.
#   engine.sh install       install the engine (ENGINE=docker|podman) and debootstrap when missing
#   engine.sh start         start the engine's API on $ENGINE_DIR (its own paths: never a user's daemon)
#   engine.sh stop          stop what `start` started, by its PID
#   engine.sh host          print the DOCKER_HOST the tests use
#   engine.sh base IMAGE    make IMAGE locally from a debootstrapped Debian when absent
# ENGINE=docker (the default, the engine of record) runs Debian's dockerd with its own
# data-root, exec-root, socket and pidfile; ENGINE=podman runs `podman system service`.
# With DOCKER_HOST already pointing at an engine, start and stop do nothing and that
# engine is used.
set -euo pipefail

ENGINE=${ENGINE:-docker}
ENGINE_DIR=${ENGINE_DIR:-/tmp/transvidio-engine}/$ENGINE
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
SUITE=${SUITE:-trixie}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

case "$ENGINE" in
docker)
    SOCKET="$ENGINE_DIR/docker.sock"
    PIDFILE="$ENGINE_DIR/dockerd.pid"
    ;;
podman)
    SOCKET="$ENGINE_DIR/podman.sock"
    PIDFILE="$ENGINE_DIR/podman.pid"
    ;;
*)
    echo "ENGINE=$ENGINE: must be docker or podman" >&2
    exit 2
    ;;
esac
CONF="$ENGINE_DIR/containers.conf"

# shellcheck source=pids.sh
. "$(dirname "$0")/pids.sh"

log() { printf 'engine(%s): %s\n' "$ENGINE" "$*" >&2; }

external_engine() { [ -n "${DOCKER_HOST:-}" ] && [ "${DOCKER_HOST}" != "unix://$SOCKET" ]; }

write_podman_conf() {
    mkdir -p "$ENGINE_DIR"
    # runc with lowered ulimits: crun (and runc with the defaults) cannot set
    # RLIMIT_NOFILE/NPROC in this sandbox.
    cat >"$CONF" <<CONF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
[network]
network_backend = "netavark"
CONF
}

# The image commands of whichever engine the tests use.
engine_cmd() {
    if external_engine; then
        docker "$@"
    elif [ "$ENGINE" = docker ]; then
        DOCKER_HOST="unix://$SOCKET" docker "$@"
    else
        write_podman_conf
        CONTAINERS_CONF="$CONF" podman "$@"
    fi
}

install() {
    local missing=() tools=(debootstrap iptables)
    local tool
    if [ "$ENGINE" = docker ]; then
        tools+=(dockerd docker containerd runc)
    else
        tools+=(podman netavark aardvark-dns runc)
    fi
    for tool in "${tools[@]}"; do
        command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/lib/podman/$tool" ] || missing+=("$tool")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        log "missing ${missing[*]}: run as root, or install Debian's docker.io (or podman) and debootstrap"
        exit 1
    fi
    local packages=(debootstrap iptables ca-certificates)
    if [ "$ENGINE" = docker ]; then
        packages+=(docker.io)
    else
        packages+=(podman netavark aardvark-dns runc uidmap slirp4netns fuse-overlayfs)
    fi
    log "installing ${packages[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null
}

running() { alive "$PIDFILE"; }

wait_for_api() {
    local waited=0
    until [ -S "$SOCKET" ] && engine_cmd version >/dev/null 2>&1; do
        sleep 0.2
        waited=$((waited + 1))
        if [ "$waited" -gt 300 ]; then
            log "no API on $SOCKET after 60 s; last lines of $ENGINE_DIR/service.log:"
            tail -n 20 "$ENGINE_DIR/service.log" >&2
            exit 1
        fi
    done
}

start() {
    if external_engine; then
        log "using the engine at DOCKER_HOST=$DOCKER_HOST"
        return 0
    fi
    mkdir -p "$ENGINE_DIR"
    if running; then
        return 0
    fi
    rm -f "$SOCKET"
    if [ "$ENGINE" = docker ]; then
        # Everything under ENGINE_DIR: a user's own dockerd (default paths) is never touched.
        nohup dockerd --data-root "$ENGINE_DIR/root" --exec-root "$ENGINE_DIR/exec" \
            -H "unix://$SOCKET" --pidfile "$PIDFILE" >"$ENGINE_DIR/service.log" 2>&1 &
    else
        write_podman_conf
        CONTAINERS_CONF="$CONF" nohup podman system service --time=0 "unix://$SOCKET" \
            >"$ENGINE_DIR/service.log" 2>&1 &
        echo $! >"$PIDFILE"
    fi
    wait_for_api
    log "up: DOCKER_HOST=unix://$SOCKET"
}

stop() {
    external_engine && return 0
    stop_pid "$PIDFILE"
    rm -f "$SOCKET"
}

host() {
    if external_engine; then
        echo "$DOCKER_HOST"
    else
        echo "unix://$SOCKET"
    fi
}

# The debootstrapped root as a tarball, shared by the engines one `make test` prepares in
# turn (Docker, Podman, the swarm's first node): one debootstrap a day, not one per engine.
BASE_CACHE=${BASE_CACHE:-/tmp/transvidio-base}

base() {
    local image=$1
    if engine_cmd image inspect "$image" >/dev/null 2>&1; then
        return 0
    fi
    local tarball="$BASE_CACHE/$SUITE.tar"
    mkdir -p "$ENGINE_DIR" "$BASE_CACHE"
    if [ -z "$(find "$tarball" -mtime -1 2>/dev/null)" ]; then
        local root
        root=$(mktemp -d)
        log "debootstrapping $SUITE into $root for $image"
        debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$ENGINE_DIR/debootstrap.log" 2>&1 || {
            tail -20 "$ENGINE_DIR/debootstrap.log" >&2
            exit 1
        }
        # The proxy between these machines and PyPI intercepts TLS: trust its CA
        # in this locally made base only; the Dockerfiles stay as shipped.
        if [ -f "$CA_BUNDLE" ]; then
            mkdir -p "$root/etc/ssl/certs"
            cp "$CA_BUNDLE" "$root/etc/ssl/certs/ca-certificates.crt"
        fi
        rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
        tar -C "$root" -cf "$tarball.part" .
        mv "$tarball.part" "$tarball"
        rm -rf "$root"
    fi
    engine_cmd import \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' "$tarball" "$image" >/dev/null
    log "made $image"
}

case "${1:-}" in
install) install ;;
start) start ;;
stop) stop ;;
host) host ;;
base) base "${2:?usage: engine.sh base IMAGE}" ;;
*)
    echo "usage: ENGINE=docker|podman engine.sh install|start|stop|host|base IMAGE" >&2
    exit 2
    ;;
esac
