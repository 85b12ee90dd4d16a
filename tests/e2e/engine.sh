#!/usr/bin/env bash
# Prepares a Docker-API container engine for the end-to-end tests.
#   engine.sh install       install Podman and friends when missing (Debian, as root)
#   engine.sh start         start `podman system service` on $ENGINE_DIR/podman.sock
#   engine.sh stop          stop the service started by `start` (by its PID)
#   engine.sh base IMAGE    make IMAGE locally from a debootstrapped Debian when absent
# With DOCKER_HOST already pointing at a real engine, `start` and `stop` do nothing.
set -euo pipefail

ENGINE_DIR=${ENGINE_DIR:-/tmp/transvidio-engine}
SOCKET="$ENGINE_DIR/podman.sock"
PIDFILE="$ENGINE_DIR/podman.pid"
CONF="$ENGINE_DIR/containers.conf"
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
SUITE=${SUITE:-trixie}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

log() { printf 'engine: %s\n' "$*" >&2; }

write_conf() {
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

podman_cmd() { CONTAINERS_CONF="$CONF" podman "$@"; }

external_engine() { [ -n "${DOCKER_HOST:-}" ] && [ "${DOCKER_HOST}" != "unix://$SOCKET" ]; }

# The image commands of whichever engine the tests use.
engine_cmd() {
    if external_engine; then
        docker "$@"
    else
        podman_cmd "$@"
    fi
}

install() {
    local missing=()
    local tool
    for tool in podman netavark aardvark-dns runc debootstrap iptables; do
        command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/lib/podman/$tool" ] || missing+=("$tool")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        log "missing ${missing[*]}: run as root or install podman netavark aardvark-dns runc debootstrap"
        exit 1
    fi
    log "installing ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        podman netavark aardvark-dns runc debootstrap uidmap slirp4netns fuse-overlayfs \
        iptables ca-certificates >/dev/null
}

start() {
    if external_engine; then
        log "using the engine at DOCKER_HOST=$DOCKER_HOST"
        return 0
    fi
    write_conf
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        return 0
    fi
    rm -f "$SOCKET"
    CONTAINERS_CONF="$CONF" nohup podman system service --time=0 "unix://$SOCKET" \
        >"$ENGINE_DIR/service.log" 2>&1 &
    echo $! >"$PIDFILE"
    local waited=0
    until [ -S "$SOCKET" ]; do
        sleep 0.2
        waited=$((waited + 1))
        if [ "$waited" -gt 100 ]; then
            log "podman service did not create $SOCKET; see $ENGINE_DIR/service.log"
            exit 1
        fi
    done
    log "podman service up: DOCKER_HOST=unix://$SOCKET"
}

stop() {
    if [ -f "$PIDFILE" ]; then
        kill "$(cat "$PIDFILE")" 2>/dev/null || true
        rm -f "$PIDFILE" "$SOCKET"
    fi
}

base() {
    local image=$1
    write_conf
    if engine_cmd image inspect "$image" >/dev/null 2>&1; then
        return 0
    fi
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
    tar -C "$root" -c . | engine_cmd import \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
    rm -rf "$root"
    log "made $image"
}

case "${1:-}" in
install) install ;;
start) start ;;
stop) stop ;;
base) base "${2:?usage: engine.sh base IMAGE}" ;;
*)
    echo "usage: engine.sh install|start|stop|base IMAGE" >&2
    exit 2
    ;;
esac
