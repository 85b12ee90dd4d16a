"""Every file the stack puts into a container, rendered from typed settings.

Pure functions from settings (and the topology derived from them) to text. The
components upload exactly these strings; `python -m components.render --stack dev
--out DIR` writes them to DIR for review, like `helm template`, without the Pulumi CLI.
Secrets never appear here: containers read them from separately uploaded files.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from components.settings import MAX_POSTGRES_REPLICAS, PROJECT, Settings, SettingsError, parse
from components.topology import (
    BACKEND_PORT,
    NGINX_HTTP_PORT,
    NGINX_HTTPS_PORT,
    POSTGRES_APP_USER,
    POSTGRES_DB,
    POSTGRES_PORT,
    POSTGRES_REPLICATION_USER,
    REDIS_MASTER_NAME,
    REDIS_PORT,
    SENTINEL_PORT,
    SSH_PORT,
    Node,
    Topology,
)

# Where the images expect what we upload (the entrypoints in images/ read these paths).
SECRETS_DIR = "/etc/transvidio/secrets"
POSTGRES_CONF_DIR = "/etc/transvidio/postgres"
REDIS_CONF_DIR = "/etc/transvidio/redis"
NGINX_CONF_DIR = "/etc/transvidio/nginx"
MPI_CONF_DIR = "/etc/transvidio/mpi"
UPLOADS_DIR = "/srv/transvidio/uploads"
OUTPUTS_DIR = "/srv/transvidio/outputs"
WORKSPACE_DIR = "/srv/transvidio/workspace"
POSTGRES_DATA_DIR = "/var/lib/postgresql/data"  # each node's volume
POSTGRES_RUN_DIR = "/var/lib/postgresql/run"  # sockets, the pgpass file, locks
PGBACKREST_REPO_DIR = "/var/lib/pgbackrest"  # the backup repository volume
PGBACKREST_CONF = f"{POSTGRES_CONF_DIR}/pgbackrest.conf"
PGBACKREST_STANZA = PROJECT

HEADER = "# Rendered by transvidio-cluster from the stack's settings; edit the stack config, not this file.\n"


def _pg_size(size_bytes: int) -> str:
    """A size in PostgreSQL's units, in the largest unit that divides it."""
    for unit, factor in (("GB", 1024**3), ("MB", 1024**2)):
        if size_bytes % factor == 0:
            return f"{size_bytes // factor}{unit}"
    return f"{size_bytes // 1024}kB"


# --- PostgreSQL -----------------------------------------------------------------------


def postgresql_conf(settings: Settings, node: Node) -> str:
    """postgresql.conf for the primary or a replica (same shape; replicas add standby settings)."""
    pg = settings.postgres
    # Sized for the most replicas a stack may have (plus room for a re-bootstrap while an old
    # slot lingers), not for today's count: scaling replicas leaves this file as it is.
    replica_slots = MAX_POSTGRES_REPLICAS + 2
    lines = [
        "listen_addresses = '*'",
        f"port = {POSTGRES_PORT}",
        f"hba_file = '{POSTGRES_CONF_DIR}/pg_hba.conf'",
        f"unix_socket_directories = '{POSTGRES_RUN_DIR}'",
        "password_encryption = 'scram-sha-256'",
        "max_connections = 200",
        f"shared_buffers = '{_pg_size(pg.shared_buffers)}'",
        f"work_mem = '{_pg_size(pg.work_mem)}'",
        f"maintenance_work_mem = '{_pg_size(pg.maintenance_work_mem)}'",
        "wal_level = replica",
        f"max_wal_senders = {replica_slots + 2}",
        f"max_replication_slots = {replica_slots}",
        "wal_keep_size = '256MB'",
        f"max_slot_wal_keep_size = '{_pg_size(pg.max_slot_wal_keep_size)}'",
        "hot_standby = on",
        "hot_standby_feedback = on",
        "wal_receiver_timeout = '30s'",
        "wal_sender_timeout = '30s'",
        "log_destination = 'stderr'",
        # Off: healthchecks connect every few seconds and would flood the log.
        "log_connections = off",
        "log_replication_commands = on",
        "log_line_prefix = '%m [%p] %q%u@%d '",
        # Every WAL segment goes to the backup repository (a standby archives nothing until
        # it is promoted); a quiet primary still switches segments every archive_timeout.
        "archive_mode = on",
        f"archive_command = 'pgbackrest --config={PGBACKREST_CONF} --stanza={PGBACKREST_STANZA} archive-push %p'",
        f"archive_timeout = '{pg.archive_timeout_seconds}s'",
    ]
    if node.role == "postgres-replica":
        lines += [
            f"primary_conninfo = 'host={Topology(settings).postgres_primary.hostname} port={POSTGRES_PORT} "
            f"user={POSTGRES_REPLICATION_USER} application_name={node.slot_name} "
            f"passfile={POSTGRES_RUN_DIR}/pgpass'",
            f"primary_slot_name = '{node.slot_name}'",
        ]
    return HEADER + "\n".join(lines) + "\n"


def pgbackrest_conf(settings: Settings) -> str:
    """pgBackRest on the primary: the repository volume, retention, and the local cluster."""
    pg = settings.postgres
    lines = [
        "[global]",
        f"repo1-path={PGBACKREST_REPO_DIR}",
        "repo1-retention-full-type=count",
        f"repo1-retention-full={pg.backup_retention_full}",
        "compress-type=zst",
        # A backup starts with an immediate checkpoint rather than waiting for the next one.
        "start-fast=y",
        "log-level-console=info",
        "log-level-file=off",
        f"lock-path={POSTGRES_RUN_DIR}/pgbackrest",
        "",
        f"[{PGBACKREST_STANZA}]",
        f"pg1-path={POSTGRES_DATA_DIR}",
        f"pg1-socket-path={POSTGRES_RUN_DIR}",
        f"pg1-port={POSTGRES_PORT}",
    ]
    return HEADER + "\n".join(lines) + "\n"


def pg_hba_conf(settings: Settings) -> str:
    """Local superuser by peer; replication and the app only from the data subnet, by SCRAM."""
    subnet = settings.network.data_subnet
    rows = [
        ("local", "all", "postgres", "", "peer"),
        ("host", "replication", POSTGRES_REPLICATION_USER, str(subnet), "scram-sha-256"),
        ("host", POSTGRES_DB, POSTGRES_APP_USER, str(subnet), "scram-sha-256"),
        ("host", "all", "all", "0.0.0.0/0", "reject"),
    ]
    body = "\n".join(f"{t:<7} {db:<12} {user:<12} {addr:<18} {method}".rstrip() for t, db, user, addr, method in rows)
    return HEADER + body + "\n"


def primary_setup_sql() -> str:
    """Idempotent roles and database, run by the primary's entrypoint on every start.

    Passwords are read by psql from the secret files, never passed on a command line.
    """
    return f"""-- Rendered by transvidio-cluster. Runs on every start of the primary; idempotent.
\\set ON_ERROR_STOP on
\\set superuser_password `cat {SECRETS_DIR}/postgres-password`
\\set replication_password `cat {SECRETS_DIR}/replication-password`
\\set app_password `cat {SECRETS_DIR}/app-db-password`
-- initdb set the superuser's first password; this applies a rotated one.
ALTER ROLE postgres WITH PASSWORD :'superuser_password';
SELECT 'CREATE ROLE {POSTGRES_REPLICATION_USER} WITH LOGIN REPLICATION'
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{POSTGRES_REPLICATION_USER}') \\gexec
ALTER ROLE {POSTGRES_REPLICATION_USER} WITH LOGIN REPLICATION NOSUPERUSER PASSWORD :'replication_password';
SELECT 'CREATE ROLE {POSTGRES_APP_USER} WITH LOGIN'
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{POSTGRES_APP_USER}') \\gexec
ALTER ROLE {POSTGRES_APP_USER} WITH LOGIN NOSUPERUSER NOREPLICATION PASSWORD :'app_password';
GRANT pg_monitor TO {POSTGRES_APP_USER};
SELECT 'CREATE DATABASE {POSTGRES_DB} OWNER {POSTGRES_APP_USER}'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{POSTGRES_DB}') \\gexec
REVOKE CONNECT ON DATABASE {POSTGRES_DB} FROM PUBLIC;
GRANT CONNECT ON DATABASE {POSTGRES_DB} TO {POSTGRES_APP_USER};
"""


# --- Redis and Sentinel ---------------------------------------------------------------


def redis_conf(settings: Settings, node: Node) -> str:
    """A data node's config. Its role (master or replica) is decided at start by asking the Sentinels."""
    r = settings.redis
    lines = [
        "bind 0.0.0.0",
        f"port {REDIS_PORT}",
        "protected-mode no",
        "dir /data",
        "appendonly yes",
        "appendfsync everysec",
        f"maxmemory {r.maxmemory}",
        f"maxmemory-policy {r.maxmemory_policy}",
        f"min-replicas-to-write {r.min_replicas_to_write}",
        f"min-replicas-max-lag {r.min_replicas_max_lag}",
        # Fixed addresses, not names: Sentinel and clients never resolve a stopped container's name.
        f"replica-announce-ip {node.data_ip}",
        "replica-read-only yes",
        "replica-serve-stale-data yes",
        "repl-diskless-sync yes",
    ]
    return HEADER + "\n".join(lines) + "\n"


def sentinel_conf(settings: Settings, node: Node) -> str:
    """The Sentinel seed; the entrypoint copies it to the volume when absent, adds auth."""
    r = settings.redis
    master = Topology(settings).redis_nodes[0]
    lines = [
        f"port {SENTINEL_PORT}",
        "bind 0.0.0.0",
        "protected-mode no",
        "dir /data",
        # Every node keeps a fixed address (see Topology), so Sentinel works with addresses and
        # never blocks on DNS for a container that is down; names are still accepted in commands.
        "sentinel resolve-hostnames yes",
        "sentinel announce-hostnames no",
        f"sentinel announce-ip {node.data_ip}",
        f"sentinel monitor {REDIS_MASTER_NAME} {master.data_ip} {REDIS_PORT} {r.quorum}",
        f"sentinel down-after-milliseconds {REDIS_MASTER_NAME} {r.down_after_ms}",
        f"sentinel failover-timeout {REDIS_MASTER_NAME} {r.failover_timeout_ms}",
        f"sentinel parallel-syncs {REDIS_MASTER_NAME} 1",
    ]
    return HEADER + "\n".join(lines) + "\n"


def sentinel_addresses(settings: Settings) -> str:
    """`ip:port,ip:port` of every Sentinel, as data nodes and backends take it."""
    return ",".join(f"{s.data_ip}:{SENTINEL_PORT}" for s in Topology(settings).sentinels)


# --- MPI ------------------------------------------------------------------------------


def hostfile(settings: Settings) -> str:
    slots = settings.mpi.slots_per_node
    return "".join(f"{node.hostname} slots={slots}\n" for node in Topology(settings).mpi_nodes)


def known_hosts(settings: Settings, host_public_keys: Sequence[str]) -> str:
    """One `name,ip key` line per MPI node, pinned to the keys the stack generated."""
    nodes = Topology(settings).mpi_nodes
    if len(nodes) != len(host_public_keys):
        raise ValueError(f"{len(nodes)} MPI nodes but {len(host_public_keys)} host keys")
    return "".join(
        f"{node.hostname},{node.data_ip} {key.strip()}\n" for node, key in zip(nodes, host_public_keys, strict=True)
    )


def openmpi_mca_params(settings: Settings) -> str:
    """Open MPI's own parameters: TCP only, pinned to the data subnet.

    Open MPI 5 has neither `oob_tcp_if_include` (out-of-band traffic is PRRTE's, pinned by
    `prte_if_include`) nor `btl_vader_single_copy_mechanism` (and without the shared-memory
    BTL no single-copy mechanism is used): it ignores both silently, so they are not written.
    """
    subnet = settings.network.data_subnet
    return HEADER + f"btl = self,tcp\nbtl_tcp_if_include = {subnet}\n"


def prte_mca_params(settings: Settings) -> str:
    """PRRTE (Open MPI 5's launcher): interface pinning and ssh options."""
    subnet = settings.network.data_subnet
    return (
        HEADER
        + f"prte_if_include = {subnet}\n"
        # Containers share the host's cores: binding every node's first rank to "core 0"
        # would put all ranks on the same host core and serialise them.
        + "hwloc_default_binding_policy = none\n"
        + "plm_ssh_args = -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=10\n"
    )


# --- backend --------------------------------------------------------------------------

# The backend's secrets, each a file under SECRETS_DIR named here; the environment carries
# only its path, in <NAME>_FILE (a value in the environment shows in `docker inspect` and is
# inherited by every child process).
BACKEND_SECRET_FILES = {
    "POSTGRES_PASSWORD": "app-db-password",
    "REDIS_PASSWORD": "redis-password",
    "SECRET_KEY": "secret-key",
}


def secret_path(name: str) -> str:
    """Where a container finds the secret BACKEND_SECRET_FILES names `name`."""
    return f"{SECRETS_DIR}/{BACKEND_SECRET_FILES[name]}"


def backend_environment(settings: Settings) -> dict[str, str]:
    """The backend's env contract: names, addresses, limits and the paths of its secret files."""
    topo = Topology(settings)
    return {
        "POSTGRES_MASTER_HOST": topo.postgres_primary.hostname,
        "POSTGRES_SLAVE_HOSTS": ",".join(r.hostname for r in topo.postgres_replicas),
        "POSTGRES_PORT": str(POSTGRES_PORT),
        "POSTGRES_DB": POSTGRES_DB,
        "POSTGRES_USER": POSTGRES_APP_USER,
        "REDIS_SENTINELS": sentinel_addresses(settings),
        "REDIS_MASTER_NAME": REDIS_MASTER_NAME,
        "MPI_MASTER_HOST": topo.mpi_master.hostname,
        "MPI_SSH_PORT": str(SSH_PORT),
        "UPLOADS_DIR": UPLOADS_DIR,
        "OUTPUTS_DIR": OUTPUTS_DIR,
        # The same limits as nginx's: the app holds to them when reached some other way.
        "MAX_UPLOAD_BYTES": str(settings.nginx.max_body_size_mb * 1024 * 1024),
        "MAX_JSON_BYTES": str(API_MAX_BODY_KB * 1024),
        **{f"{name}_FILE": secret_path(name) for name in sorted(BACKEND_SECRET_FILES)},
    }


def mpi_runner_environment(settings: Settings) -> dict[str, str]:
    """The MPI master's job runner: the queue in PostgreSQL and the shared volumes."""
    contract = backend_environment(settings)
    keys = (
        "POSTGRES_MASTER_HOST",
        "POSTGRES_PORT",
        "POSTGRES_DB",
        "POSTGRES_USER",
        "POSTGRES_PASSWORD_FILE",
        "UPLOADS_DIR",
        "OUTPUTS_DIR",
    )
    return {key: contract[key] for key in keys}


# --- nginx ----------------------------------------------------------------------------


# Every backend carries this alias on the edge network; nginx resolves it to find them.
BACKENDS_ALIAS = "backends"
NGINX_UPSTREAMS_FILE = "/var/cache/nginx/upstream-servers.conf"
UPSTREAM_SERVER_PARAMS = "max_fails=2 fail_timeout=10s"


def nginx_environment() -> dict[str, str]:
    """What the nginx entrypoint needs to keep the upstream list in step with the pool."""
    return {
        "UPSTREAM_NAME": BACKENDS_ALIAS,
        "UPSTREAM_PORT": str(BACKEND_PORT),
        "UPSTREAM_FILE": NGINX_UPSTREAMS_FILE,
        "UPSTREAM_SERVER_PARAMS": UPSTREAM_SERVER_PARAMS,
    }


# Passive health: a backend that fails to connect, times out or answers 502/504 is skipped
# (and after max_fails, rested). Not 503: the app answers 503 when a dependency is down,
# which says nothing about the backend, and counting it would let any client that asks
# for a degraded /api/health twice take every backend out of the pool.
_PROXY_TO_BACKENDS = """proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_next_upstream error timeout http_502 http_504;
            proxy_next_upstream_tries 3;
            proxy_connect_timeout 2s;
            proxy_send_timeout 300s;
            proxy_read_timeout 300s;
            proxy_request_buffering off;"""

# Bodies other than uploads are small JSON documents.
API_MAX_BODY_KB = 64
# Only with TLS on: browsers then refuse plain HTTP to this host for a year.
HSTS = """
        add_header Strict-Transport-Security "max-age=31536000" always;"""


def _cluster_only(settings: Settings) -> str:
    """Allow the cluster's own networks; the bridge gateway is how the host (and anything
    published) reaches nginx, so it is refused first."""
    gateway = settings.network.edge_subnet.network_address + 1
    return f"""deny {gateway};
            allow 127.0.0.1;
            allow {settings.network.edge_subnet};
            deny all;"""


def nginx_conf(settings: Settings) -> str:
    """The load balancer: /api/ to every backend, /outputs/ from the shared volume.

    The upstream's servers are not in this file: the entrypoint writes them to
    NGINX_UPSTREAMS_FILE from the backends alias and reloads nginx when they change, so
    scaling the pool changes neither this file nor the nginx container. With TLS, the
    HTTP port only redirects to HTTPS (and answers the container's own healthcheck).
    """
    ngx = settings.nginx
    local = f"""location = /health {{
            access_log off;
            default_type text/plain;
            return 200 "ok\\n";
        }}

        location = /nginx-status {{
            stub_status;
            {_cluster_only(settings)}
        }}"""
    service = f"""client_max_body_size {API_MAX_BODY_KB}k;
        # These time the gaps between reads, not whole transfers: a slow 500 MB upload is fine.
        client_body_timeout 120s;
        send_timeout 120s;
        add_header X-Content-Type-Options nosniff always;
        add_header X-Frame-Options DENY always;
        add_header Referrer-Policy no-referrer always;{HSTS if settings.tls_enabled else ""}

        {local}

        location /outputs/ {{
            alias {OUTPUTS_DIR}/;
            autoindex off;
            limit_except GET HEAD {{ deny all; }}
        }}

        # Readiness names every dependency and its address: for the cluster, not for clients.
        location = /api/health {{
            {_cluster_only(settings)}
            {_PROXY_TO_BACKENDS}
        }}

        location = /api/uploads {{
            client_max_body_size {ngx.max_body_size_mb}m;
            {_PROXY_TO_BACKENDS}
        }}

        location /api/ {{
            {_PROXY_TO_BACKENDS}
        }}"""
    if settings.tls_enabled:
        https_port = settings.nginx.https_port
        authority = "$host" if https_port == 443 else f"$host:{https_port}"
        servers = f"""server {{
        listen {NGINX_HTTP_PORT};
        server_name _;

        {local}

        location / {{
            return 301 https://{authority}$request_uri;
        }}
    }}

    server {{
        listen {NGINX_HTTPS_PORT} ssl;
        server_name _;
        ssl_certificate {SECRETS_DIR}/tls.crt;
        ssl_certificate_key {SECRETS_DIR}/tls.key;
        ssl_protocols TLSv1.2 TLSv1.3;

        {service}
    }}"""
    else:
        servers = f"""server {{
        listen {NGINX_HTTP_PORT};
        server_name _;

        {service}
    }}"""
    return f"""# Rendered by transvidio-cluster from the stack's settings; edit the stack config, not this file.
worker_processes {ngx.worker_processes};
pid /tmp/nginx.pid;
error_log stderr warn;

events {{
    worker_connections {ngx.worker_connections};
}}

http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log /dev/stdout;
    server_tokens off;
    sendfile on;
    client_body_temp_path /var/cache/nginx/client_temp;
    proxy_temp_path /var/cache/nginx/proxy_temp;
    fastcgi_temp_path /var/cache/nginx/fastcgi_temp;
    uwsgi_temp_path /var/cache/nginx/uwsgi_temp;
    scgi_temp_path /var/cache/nginx/scgi_temp;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      '';
    }}

    upstream backends {{
        zone backends 64k;
        include {NGINX_UPSTREAMS_FILE};
        keepalive 32;
    }}

    {servers}
}}
"""


# --- the render command ---------------------------------------------------------------


def rendered_files(settings: Settings, host_public_keys: Sequence[str] | None = None) -> dict[str, str]:
    """Every rendered file of the stack, keyed by a path relative to the output directory."""
    topo = Topology(settings)
    keys = host_public_keys or [f"ssh-ed25519 <host key of {n.hostname}>" for n in topo.mpi_nodes]
    files = {
        "postgres/pg_hba.conf": pg_hba_conf(settings),
        "postgres/primary-setup.sql": primary_setup_sql(),
        "postgres/pgbackrest.conf": pgbackrest_conf(settings),
        f"postgres/{topo.postgres_primary.hostname}.conf": postgresql_conf(settings, topo.postgres_primary),
        "nginx/nginx.conf": nginx_conf(settings),
        "backend/environment": "".join(f"{k}={v}\n" for k, v in sorted(backend_environment(settings).items())),
        "mpi/hostfile": hostfile(settings),
        "mpi/known_hosts": known_hosts(settings, keys),
        "mpi/openmpi-mca-params.conf": openmpi_mca_params(settings),
        "mpi/prte-mca-params.conf": prte_mca_params(settings),
    }
    for replica in topo.postgres_replicas:
        files[f"postgres/{replica.hostname}.conf"] = postgresql_conf(settings, replica)
    for node in topo.redis_nodes:
        files[f"redis/{node.hostname}.conf"] = redis_conf(settings, node)
    for sentinel in topo.sentinels:
        files[f"redis/{sentinel.hostname}.conf"] = sentinel_conf(settings, sentinel)
    return files


def read_stack_file(project_dir: pathlib.Path, stack: str) -> dict[str, Any]:
    """The `transvidio:` keys of Pulumi.<stack>.yaml over Pulumi.yaml's defaults, without the prefix."""
    import yaml

    project = yaml.safe_load((project_dir / "Pulumi.yaml").read_text())
    raw: dict[str, Any] = {}
    for key, declaration in (project.get("config") or {}).items():
        if isinstance(declaration, dict) and "default" in declaration:
            raw[key.split(":", 1)[-1]] = declaration["default"]
    stack_file = project_dir / f"Pulumi.{stack}.yaml"
    if not stack_file.exists():
        raise SettingsError(f"no stack file {stack_file}")
    for key, value in ((yaml.safe_load(stack_file.read_text()) or {}).get("config") or {}).items():
        if key.startswith(PROJECT + ":"):
            raw[key.split(":", 1)[1]] = value
    return raw


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write every file a stack puts into its containers.")
    parser.add_argument("--stack", required=True, help="stack name: reads Pulumi.<stack>.yaml")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="directory to write into")
    parser.add_argument("--project-dir", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent.parent)
    args = parser.parse_args(argv)
    raw = read_stack_file(args.project_dir, args.stack)
    try:
        # Secrets are not read: a `secure:` value only tells that the key is set.
        tls = all(isinstance(raw.get(k), dict) for k in ("tlsCertificate", "tlsKey"))
        settings = parse(args.stack, raw, tls_enabled=tls)
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for relative, text in sorted(rendered_files(settings).items()):
        path = args.out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
