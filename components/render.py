"""Every file the stack puts into a container, rendered from typed settings.

Pure functions from settings (and the topology derived from them) to text. The
components upload exactly these strings; `python -m components.render --stack dev
--out DIR` writes them to DIR for review, like `helm template`, without the Pulumi CLI.
Secrets never appear here: containers read them from separately uploaded files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from components.settings import MAX_POSTGRES_REPLICAS, PROJECT, SECRET_KEYS, Settings, SettingsError, parse
from components.topology import (
    BACKEND_PORT,
    ETCD_CLIENT_PORT,
    ETCD_PEER_PORT,
    NGINX_HTTP_PORT,
    NGINX_HTTPS_PORT,
    PATRONI_API_USER,
    PATRONI_PORT,
    POSTGRES_APP_USER,
    POSTGRES_DB,
    POSTGRES_PORT,
    POSTGRES_REPLICATION_USER,
    POSTGRES_REWIND_USER,
    REDIS_ADMIN_USER,
    REDIS_APP_USER,
    REDIS_MASTER_NAME,
    REDIS_PORT,
    REDIS_REPLICATION_USER,
    REDIS_SENTINEL_USER,
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
OUTPUTS_INTERNAL_PREFIX = "/_outputs/"
WORKSPACE_DIR = "/srv/transvidio/workspace"
POSTGRES_DATA_DIR = "/var/lib/postgresql/data"  # each node's volume
POSTGRES_RUN_DIR = "/var/lib/postgresql/run"  # sockets, the pgpass file, locks
PGBACKREST_REPO_DIR = "/var/lib/pgbackrest"  # the backup repository volume
PGBACKREST_CONF = f"{POSTGRES_CONF_DIR}/pgbackrest.conf"
PGBACKREST_STANZA = PROJECT
ETCD_DATA_DIR = "/var/lib/etcd"

HEADER = "# Rendered by transvidio-cluster from the stack's settings; edit the stack config, not this file.\n"


def _pg_size(size_bytes: int) -> str:
    """A size in PostgreSQL's units, in the largest unit that divides it."""
    for unit, factor in (("GB", 1024**3), ("MB", 1024**2)):
        if size_bytes % factor == 0:
            return f"{size_bytes // factor}{unit}"
    return f"{size_bytes // 1024}kB"


# --- PostgreSQL -----------------------------------------------------------------------


# Patroni passes these on postgres' command line and keeps them equal on every node (they
# live in its DCS): the bootstrap writes them there, and every start re-applies them.
def postgres_cluster_parameters(settings: Settings) -> dict[str, str | int]:
    """Parameters every node must share, sized for the most replicas a stack may have (plus
    room for a re-clone while an old slot lingers): scaling replicas changes none of them."""
    replica_slots = MAX_POSTGRES_REPLICAS + 2
    return {
        "hot_standby": "on",
        "max_connections": 200,
        "max_replication_slots": replica_slots,
        "max_wal_senders": replica_slots + 2,
        "wal_keep_size": "256MB",
        "wal_level": "replica",
        # pg_rewind needs hint bits WAL-logged to rewind an old primary that ran ahead.
        "wal_log_hints": "on",
    }


def postgresql_conf(settings: Settings) -> str:
    """The settings Patroni does not own, the same on every node (its `custom_conf`)."""
    pg = settings.postgres
    lines = [
        "password_encryption = 'scram-sha-256'",
        f"shared_buffers = '{_pg_size(pg.shared_buffers)}'",
        f"work_mem = '{_pg_size(pg.work_mem)}'",
        f"maintenance_work_mem = '{_pg_size(pg.maintenance_work_mem)}'",
        f"max_slot_wal_keep_size = '{_pg_size(pg.max_slot_wal_keep_size)}'",
        "hot_standby_feedback = on",
        "wal_receiver_timeout = '30s'",
        "wal_sender_timeout = '30s'",
        # A client that is gone without a word (its node lost, its packets dropped) holds its
        # transaction, and the locks in it, until the server notices: with the kernel's
        # defaults, two hours. Probed after 5 s idle, every 2 s, dropped after 3 misses.
        "tcp_keepalives_idle = 5",
        "tcp_keepalives_interval = 2",
        "tcp_keepalives_count = 3",
        "log_destination = 'stderr'",
        # Off: healthchecks connect every few seconds and would flood the log.
        "log_connections = off",
        "log_replication_commands = on",
        "log_line_prefix = '%m [%p] %q%u@%d '",
        # Every WAL segment goes to the backup repository (a standby archives nothing until
        # it is promoted); a quiet primary still switches segments every archive_timeout.
        "archive_mode = on",
        f"archive_command = '{PGBACKREST} archive-push %p'",
        f"archive_timeout = '{pg.archive_timeout_seconds}s'",
    ]
    return HEADER + "\n".join(lines) + "\n"


# The S3 credentials, when the repository is S3, are a pgBackRest config file of their own
# in the tier's credentials store (SECRETS_DIR): pgBackRest reads every *.conf there.
PGBACKREST_S3_CREDENTIALS = "pgbackrest-s3.conf"
S3_CA_FILE = "s3-ca.crt"
PGBACKREST = f"pgbackrest --config={PGBACKREST_CONF} --config-include-path={SECRETS_DIR} --stanza={PGBACKREST_STANZA}"
PATRONI_CALLBACK = "/usr/local/bin/patroni-callback.sh"
PATRONI_BOOTSTRAP = "/usr/local/bin/patroni-bootstrap.sh"
DCS_CONF = f"{POSTGRES_CONF_DIR}/patroni-dcs.json"
PATRONI_RUN_CONF = f"{POSTGRES_RUN_DIR}/patroni.yml"  # written at start: the config with its passwords


def patroni_dcs(settings: Settings) -> dict[str, Any]:
    """Patroni's cluster-wide settings (its DCS), written at bootstrap and re-applied by every
    primary on start, so that a changed setting reaches a running cluster."""
    pg = settings.postgres
    ttl, detect = pg.failover_ttl_seconds, pg.failover_detect_seconds
    # Patroni's rule: loop_wait + 2 x retry_timeout <= ttl.
    if detect:
        # leader-fence.sh ends a silent primary's lock after `detect` seconds: by then that
        # primary must have demoted itself, which it does within loop_wait + retry_timeout.
        loop_wait = 1
        retry_timeout = min(detect - 2, (ttl - 1) // 2)
    else:
        loop_wait = max(1, ttl // 4)
        retry_timeout = (ttl - loop_wait) // 2
    return {
        "ttl": ttl,
        "loop_wait": loop_wait,
        "retry_timeout": retry_timeout,
        # A replica further behind than this never becomes primary on its own.
        "maximum_lag_on_failover": 1024 * 1024,
        # A commit returns once the synchronous standby has it, and only that standby may be
        # promoted: no acknowledged write is lost in a failover. (Patroni 4's quorum mode was
        # tried and left: on this host its replicas sometimes all declined the leader race.)
        "synchronous_mode": pg.synchronous,
        "synchronous_node_count": 1,
        # Patroni 4 keeps a gone member's slot for 30 min by default: a replica the stack
        # no longer has would pin WAL that long. Dropped once its member key expires (ttl).
        "member_slots_ttl": 0,
        "postgresql": {
            "use_pg_rewind": True,
            "use_slots": True,
            "parameters": postgres_cluster_parameters(settings),
        },
    }


def patroni_dcs_json(settings: Settings) -> str:
    """The DCS settings as the file a new primary applies with `patronictl edit-config`."""
    return json.dumps(patroni_dcs(settings), indent=2, sort_keys=True) + "\n"


def patroni_yml(settings: Settings, node: Node) -> str:
    """Patroni's config for one PostgreSQL node, without its passwords and bin_dir (the
    entrypoint adds them from the secret files and the installed server)."""
    topo = Topology(settings)
    pg = settings.postgres
    restore = pg.restore_target
    recovery: dict[str, str] = {
        "restore_command": f'{PGBACKREST} archive-get %f "%p"',
        "recovery_target_action": "promote",
        "recovery_target_timeline": "latest",
    }
    if restore and restore != "latest":
        recovery["recovery_target_time"] = restore
    methods: dict[str, Any] = {
        # Fresh: initdb, unless the backup repository holds backups of this stack.
        "fresh": {"command": f"{PATRONI_BOOTSTRAP} fresh", "no_params": True},
        "restore": {
            # The target picks the backup to start from: the newest one taken before it.
            "command": f"{PATRONI_BOOTSTRAP} restore {shlex.quote(restore or 'latest')}",
            "no_params": True,
            # Patroni writes these and recovery.signal: archive recovery to the target, then promote.
            "recovery_conf": recovery,
        },
    }
    config: dict[str, Any] = {
        "scope": settings.prefix,
        "namespace": "/transvidio/",
        "name": node.hostname,
        "restapi": {
            "listen": f"0.0.0.0:{PATRONI_PORT}",
            "connect_address": f"{node.data_address}:{PATRONI_PORT}",
            # Its password is added at start: switchover, restart and config changes need it.
            "authentication": {"username": PATRONI_API_USER},
        },
        "etcd3": {
            "hosts": [f"{e.data_address}:{ETCD_CLIENT_PORT}" for e in topo.etcd_nodes],
            "protocol": "http",
        },
        "bootstrap": {
            "dcs": patroni_dcs(settings),
            "method": "restore" if restore else "fresh",
            "fresh": methods["fresh"],
            "restore": methods["restore"],
            # Roles, passwords and the app's database, once the first primary is up.
            "post_bootstrap": f"{PATRONI_CALLBACK} post_bootstrap",
        },
        "postgresql": {
            "listen": f"0.0.0.0:{POSTGRES_PORT}",
            "connect_address": f"{node.data_address}:{POSTGRES_PORT}",
            "data_dir": POSTGRES_DATA_DIR,
            "custom_conf": f"{POSTGRES_CONF_DIR}/postgresql.conf",
            "pgpass": f"{POSTGRES_RUN_DIR}/patroni-pgpass",
            # Patroni asks its own node for its timeline over a replication connection:
            # through the socket, which pg_hba allows the replication role (by password).
            "use_unix_socket": True,
            "use_unix_socket_repl": True,
            "parameters": {
                "hba_file": f"{POSTGRES_CONF_DIR}/pg_hba.conf",
                "ident_file": f"{POSTGRES_CONF_DIR}/pg_ident.conf",
                "unix_socket_directories": POSTGRES_RUN_DIR,
            },
            "authentication": {
                "superuser": {"username": "postgres"},
                "replication": {"username": POSTGRES_REPLICATION_USER},
                "rewind": {"username": POSTGRES_REWIND_USER},
            },
            "callbacks": {
                "on_start": PATRONI_CALLBACK,
                "on_role_change": PATRONI_CALLBACK,
            },
            "create_replica_methods": ["basebackup"],
            "basebackup": [{"checkpoint": "fast"}],
            "remove_data_directory_on_rewind_failure": True,
            "remove_data_directory_on_diverged_timelines": True,
        },
        "log": {"level": "INFO", "format": "%(asctime)s patroni %(levelname)s: %(message)s"},
    }
    return HEADER + json.dumps(config, indent=2, sort_keys=True) + "\n"


def etcd_yml(settings: Settings, node: Node) -> str:
    """One etcd member: the cluster's fixed addresses (on a swarm, its names), its data on its volume."""
    members = Topology(settings).etcd_nodes
    # etcd listens on addresses only; a swarm task's address is known when it starts.
    listen = node.data_ip or "0.0.0.0"
    config = {
        "name": node.hostname,
        "data-dir": ETCD_DATA_DIR,
        "listen-peer-urls": f"http://{listen}:{ETCD_PEER_PORT}",
        "initial-advertise-peer-urls": f"http://{node.data_address}:{ETCD_PEER_PORT}",
        # 0.0.0.0 takes in loopback already: listing it as well is a bind that fails.
        "listen-client-urls": f"http://{listen}:{ETCD_CLIENT_PORT}"
        + ("" if node.data_ip is None else f",http://127.0.0.1:{ETCD_CLIENT_PORT}"),
        "advertise-client-urls": f"http://{node.data_address}:{ETCD_CLIENT_PORT}",
        "initial-cluster": ",".join(f"{m.hostname}=http://{m.data_address}:{ETCD_PEER_PORT}" for m in members),
        "initial-cluster-state": "new",
        "initial-cluster-token": settings.prefix,
        # Patroni's keys are few and small: keep history short and the database small.
        "auto-compaction-mode": "revision",
        "auto-compaction-retention": "1000",
        "quota-backend-bytes": 256 * 1024 * 1024,
        "log-level": "warn",
    }
    return HEADER + json.dumps(config, indent=2, sort_keys=True) + "\n"


def pgbackrest_conf(settings: Settings) -> str:
    """pgBackRest on the primary: the repository (the volume, or an S3 bucket under a path of
    the stack's own), retention, and the local cluster."""
    pg = settings.postgres
    if pg.backup_repository == "s3":
        host, _, port = pg.s3_endpoint.partition(":")
        repository = [
            "repo1-type=s3",
            f"repo1-path=/{settings.prefix}",
            f"repo1-s3-bucket={pg.s3_bucket}",
            f"repo1-s3-endpoint={host}",
            f"repo1-s3-region={pg.s3_region}",
            f"repo1-s3-uri-style={pg.s3_uri_style}",
            *([f"repo1-storage-port={port}"] if port else []),
            # The key and its secret are in PGBACKREST_S3_CREDENTIALS, beside the other secrets.
            *(
                [f"repo1-storage-ca-file={SECRETS_DIR}/{S3_CA_FILE}"]
                if "s3CaCertificate" in settings.secrets_set
                else []
            ),
        ]
    else:
        repository = [f"repo1-path={PGBACKREST_REPO_DIR}"]
    lines = [
        "[global]",
        *repository,
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


def pgbackrest_s3_credentials(key_id: str, secret: str) -> str:
    """The S3 key and secret as a pgBackRest config file (the checks at preview keep both on one line)."""
    return f"[global]\nrepo1-s3-key={key_id}\nrepo1-s3-key-secret={secret}\n"


PG_IDENT_MAP = "local-replication"


def pg_ident_conf() -> str:
    """The node's own OS user may replicate locally as the replication role."""
    return HEADER + f"{PG_IDENT_MAP} postgres {POSTGRES_REPLICATION_USER}\n"


def pg_hba_conf(settings: Settings) -> str:
    """Local superuser by peer, local replication (Patroni's own checks) by peer as the
    replication role, so neither depends on a password a rotation is changing; replication,
    pg_rewind and the app from the data subnet only, by SCRAM."""
    subnet = settings.network.data_subnet
    rows = [
        ("local", "all", "postgres", "", "peer"),
        ("local", "replication", POSTGRES_REPLICATION_USER, "", f"peer map={PG_IDENT_MAP}"),
        ("host", "replication", POSTGRES_REPLICATION_USER, str(subnet), "scram-sha-256"),
        ("host", "postgres", POSTGRES_REWIND_USER, str(subnet), "scram-sha-256"),
        ("host", POSTGRES_DB, POSTGRES_APP_USER, str(subnet), "scram-sha-256"),
        ("host", "all", "all", "0.0.0.0/0", "reject"),
    ]
    body = "\n".join(f"{t:<7} {db:<12} {user:<12} {addr:<18} {method}".rstrip() for t, db, user, addr, method in rows)
    return HEADER + body + "\n"


def primary_setup_sql() -> str:
    """Idempotent roles and database, run on a node each time it starts as, or becomes, primary.

    Passwords are read by psql from the secret files, never passed on a command line. The
    rewind role gets only the functions pg_rewind calls, not superuser.
    """
    rewind_functions = (
        "pg_ls_dir(text, boolean, boolean)",
        "pg_stat_file(text, boolean)",
        "pg_read_binary_file(text)",
        "pg_read_binary_file(text, bigint, bigint, boolean)",
    )
    grants = "".join(
        f"GRANT EXECUTE ON FUNCTION pg_catalog.{function} TO {POSTGRES_REWIND_USER};\n" for function in rewind_functions
    )
    return f"""-- Rendered by transvidio-cluster. Runs whenever a node starts as or becomes primary; idempotent.
\\set ON_ERROR_STOP on
\\set superuser_password `cat {SECRETS_DIR}/postgres-password`
\\set replication_password `cat {SECRETS_DIR}/replication-password`
\\set rewind_password `cat {SECRETS_DIR}/rewind-password`
\\set app_password `cat {SECRETS_DIR}/app-db-password`
-- initdb set the superuser's first password; this applies a rotated one.
ALTER ROLE postgres WITH PASSWORD :'superuser_password';
SELECT 'CREATE ROLE {POSTGRES_REPLICATION_USER} WITH LOGIN REPLICATION'
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{POSTGRES_REPLICATION_USER}') \\gexec
ALTER ROLE {POSTGRES_REPLICATION_USER} WITH LOGIN REPLICATION NOSUPERUSER PASSWORD :'replication_password';
SELECT 'CREATE ROLE {POSTGRES_REWIND_USER} WITH LOGIN'
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{POSTGRES_REWIND_USER}') \\gexec
ALTER ROLE {POSTGRES_REWIND_USER} WITH LOGIN NOSUPERUSER NOREPLICATION PASSWORD :'rewind_password';
{grants}SELECT 'CREATE ROLE {POSTGRES_APP_USER} WITH LOGIN'
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{POSTGRES_APP_USER}') \\gexec
ALTER ROLE {POSTGRES_APP_USER} WITH LOGIN NOSUPERUSER NOREPLICATION PASSWORD :'app_password';
GRANT pg_monitor TO {POSTGRES_APP_USER};
SELECT 'CREATE DATABASE {POSTGRES_DB} OWNER {POSTGRES_APP_USER}'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{POSTGRES_DB}') \\gexec
REVOKE CONNECT ON DATABASE {POSTGRES_DB} FROM PUBLIC;
GRANT CONNECT ON DATABASE {POSTGRES_DB} TO {POSTGRES_APP_USER};
"""


# --- Redis and Sentinel ---------------------------------------------------------------

REDIS_ACL_FILE = f"{SECRETS_DIR}/redis-users.acl"
SENTINEL_ACL_FILE = f"{SECRETS_DIR}/sentinel-users.acl"
# Every user and what it may do, on the data nodes and on the Sentinels; `default` is off on
# both. The application reaches its own keys with the few commands it sends; replication
# only replicates; a Sentinel only monitors and reconfigures (the set Redis documents for
# it); `admin` is the operators' (its password is in the stack outputs, in no container).
REDIS_NODE_ACL: dict[str, str] = {
    REDIS_APP_USER: "~job:* resetchannels -@all +get +set +del +ping +client|setinfo",
    REDIS_REPLICATION_USER: "resetkeys resetchannels -@all +psync +sync +replconf +ping",
    REDIS_SENTINEL_USER: (
        "resetkeys allchannels -@all +multi +exec +slaveof +replicaof +ping +subscribe +publish +info +role "
        "+config|rewrite +client|setname +client|kill +script|kill"
    ),
    REDIS_ADMIN_USER: "~* &* +@all",
}
SENTINEL_ACL: dict[str, str] = {
    # Discovery only: the master's address, the Sentinels and the replicas.
    REDIS_APP_USER: (
        "resetchannels -@all +ping +client|setinfo +sentinel|masters +sentinel|get-master-addr-by-name "
        "+sentinel|sentinels +sentinel|replicas +sentinel|slaves"
    ),
    # A data node asks who the master is and, after its own restart as master, for a
    # failover (and which replicas could take over).
    REDIS_REPLICATION_USER: (
        "resetchannels -@all +ping +sentinel|get-master-addr-by-name +sentinel|failover +sentinel|replicas"
    ),
    REDIS_SENTINEL_USER: "allchannels +@all",  # the Sentinels among themselves
    REDIS_ADMIN_USER: "allchannels +@all",
}


def redis_acl(rules: Mapping[str, str], passwords: Mapping[str, str]) -> str:
    """An ACL file: each user with the SHA-256 of its password (never the password) and its
    rules, and the passwordless default user off."""
    lines = ["user default off"]
    for user in sorted(rules):
        digest = hashlib.sha256(passwords[user].encode()).hexdigest()
        lines.append(f"user {user} on #{digest} {rules[user]}")
    return "\n".join(lines) + "\n"


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
        # replica-announce-ip: the entrypoint adds this node's address (an address, never a
        # name: Sentinel would stall resolving a name that is gone).
        "replica-read-only yes",
        "replica-serve-stale-data yes",
        "repl-diskless-sync yes",
        # Start a full sync at once. Redis's default waits 5 s for more replicas to share the
        # transfer, and a failover waits for the replicas to follow the new master: a replica that
        # must resync in full (one still syncing when the master was lost) held the Sentinels'
        # switch to the new master back until failover-timeout.
        "repl-diskless-sync-delay 0",
        # Users and their rights; the entrypoint adds masterauth from its secret file.
        f"aclfile {REDIS_ACL_FILE}",
        f"masteruser {REDIS_REPLICATION_USER}",
    ]
    return HEADER + "\n".join(lines) + "\n"


def sentinel_conf(settings: Settings, node: Node) -> str:
    """The Sentinel seed; the entrypoint copies it to the volume when absent, adds users and passwords."""
    r = settings.redis
    master = Topology(settings).redis_nodes[0]
    lines = [
        f"port {SENTINEL_PORT}",
        "bind 0.0.0.0",
        "protected-mode no",
        "dir /data",
        # Sentinel works with addresses and never blocks on DNS for a node that is down: each
        # node announces its own (the entrypoints add `announce-ip`, which on a swarm is known
        # only once the task runs). Names are still accepted in commands; on a swarm the
        # initial master is one, which the entrypoint resolves when it seeds the state.
        "sentinel resolve-hostnames yes",
        "sentinel announce-hostnames no",
        f"sentinel monitor {REDIS_MASTER_NAME} {master.data_address} {REDIS_PORT} {r.quorum}",
        f"sentinel down-after-milliseconds {REDIS_MASTER_NAME} {r.down_after_ms}",
        f"sentinel failover-timeout {REDIS_MASTER_NAME} {r.failover_timeout_ms}",
        f"sentinel parallel-syncs {REDIS_MASTER_NAME} 1",
        # Users and their passwords come from the secret files at start (SENTINEL_ACL_FILE,
        # and the Sentinel user's own password for the data nodes and the other Sentinels).
        f"sentinel auth-user {REDIS_MASTER_NAME} {REDIS_SENTINEL_USER}",
        f"sentinel sentinel-user {REDIS_SENTINEL_USER}",
    ]
    return HEADER + "\n".join(lines) + "\n"


def sentinel_addresses(settings: Settings) -> str:
    """`ip:port,ip:port` of every Sentinel (names on a swarm), as data nodes and backends take it."""
    return ",".join(f"{s.data_address}:{SENTINEL_PORT}" for s in Topology(settings).sentinels)


# --- MPI ------------------------------------------------------------------------------


def hostfile(settings: Settings) -> str:
    slots = settings.mpi.slots_per_node
    return "".join(f"{node.hostname} slots={slots}\n" for node in Topology(settings).mpi_nodes)


def known_hosts(settings: Settings, host_public_keys: Sequence[str]) -> str:
    """One `name,ip key` line per MPI node (`name key` on a swarm), pinned to the keys the stack generated."""
    nodes = Topology(settings).mpi_nodes
    if len(nodes) != len(host_public_keys):
        raise ValueError(f"{len(nodes)} MPI nodes but {len(host_public_keys)} host keys")
    return "".join(
        f"{','.join(dict.fromkeys([node.hostname, node.data_address]))} {key.strip()}\n"
        for node, key in zip(nodes, host_public_keys, strict=True)
    )


def authorized_keys(settings: Settings, client_public_key: str) -> str:
    """A worker's authorized_keys: the stack's client key, from the master's address only,
    for commands alone (no forwarding, no terminal). On a swarm the master has no fixed
    address: from the data network's subnet, which only the stack's services join."""
    master = Topology(settings).mpi_master
    source = master.data_ip or str(settings.network.data_subnet)
    return f'restrict,from="{source}" {client_public_key.strip()}\n'


def openmpi_mca_params(settings: Settings) -> str:
    """Open MPI's own parameters: TCP only, pinned to the data subnet.

    Open MPI 5 has neither `oob_tcp_if_include` (out-of-band traffic is PRRTE's, pinned by
    `prte_if_include`) nor `btl_vader_single_copy_mechanism` (and without the shared-memory
    BTL no single-copy mechanism is used): it ignores both silently, so they are not written.
    """
    subnet = settings.network.data_subnet
    return HEADER + f"btl = self,tcp\nbtl_tcp_if_include = {subnet}\n"


MPI_KEEPALIVE_IDLE_SECONDS = 5
MPI_KEEPALIVE_INTERVAL_SECONDS = 2
MPI_KEEPALIVE_PROBES = 3


def prte_mca_params(settings: Settings) -> str:
    """PRRTE (Open MPI 5's launcher): interface pinning and ssh options."""
    subnet = settings.network.data_subnet
    return (
        HEADER
        + f"prte_if_include = {subnet}\n"
        # Containers share the host's cores: binding every node's first rank to "core 0"
        # would put all ranks on the same host core and serialise them.
        + "hwloc_default_binding_policy = none\n"
        # The master starts every worker's daemon itself: only it holds the client key.
        + "plm_ssh_no_tree_spawn = 1\n"
        + "plm_ssh_args = -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=10\n"
        # A node lost mid-run (its container killed, its swarm node cut off) sends nothing
        # more: without keepalive the master's daemon waits on it for good, with PRRTE's
        # defaults 8 minutes. Probes after 5 s idle, every 2 s, 3 missed: the run ends within
        # about 11 s and the attempt is retried (a node restarted at the same address answers
        # the first probe with a reset).
        + f"oob_tcp_keepalive_time = {MPI_KEEPALIVE_IDLE_SECONDS}\n"
        + f"oob_tcp_keepalive_intvl = {MPI_KEEPALIVE_INTERVAL_SECONDS}\n"
        + f"oob_tcp_keepalive_probes = {MPI_KEEPALIVE_PROBES}\n"
    )


# --- backend --------------------------------------------------------------------------

# The backend's secrets, each a file under SECRETS_DIR named here; the environment carries
# only its path, in <NAME>_FILE (a value in the environment shows in `docker inspect` and is
# inherited by every child process).
BACKEND_SECRET_FILES = {
    "API_TOKENS": "api-tokens",
    "POSTGRES_PASSWORD": "app-db-password",
    "REDIS_PASSWORD": "redis-password",
    "SECRET_KEY": "secret-key",
}


def secret_path(name: str) -> str:
    """Where a container finds the secret BACKEND_SECRET_FILES names `name`."""
    return f"{SECRETS_DIR}/{BACKEND_SECRET_FILES[name]}"


def api_tokens_file(tokens: Mapping[str, str]) -> str:
    """The backends' token file: each token's name and SHA-256, never the token itself."""
    return "".join(f"{name} {hashlib.sha256(tokens[name].encode()).hexdigest()}\n" for name in sorted(tokens))


def backend_environment(settings: Settings) -> dict[str, str]:
    """The backend's env contract: names, addresses, limits and the paths of its secret files."""
    topo = Topology(settings)
    backend = settings.backend
    postgres_hosts = ",".join(n.hostname for n in topo.postgres_nodes)
    return {
        # Every node in both: libpq connects writes to whichever is primary now
        # (target_session_attrs=read-write); reads go to the nodes streaming as standbys.
        "POSTGRES_MASTER_HOST": postgres_hosts,
        "POSTGRES_SLAVE_HOSTS": postgres_hosts,
        "POSTGRES_PORT": str(POSTGRES_PORT),
        "POSTGRES_DB": POSTGRES_DB,
        "POSTGRES_USER": POSTGRES_APP_USER,
        "REDIS_SENTINELS": sentinel_addresses(settings),
        "REDIS_MASTER_NAME": REDIS_MASTER_NAME,
        "REDIS_USER": REDIS_APP_USER,
        "MPI_MASTER_HOST": topo.mpi_master.hostname,
        "MPI_SSH_PORT": str(SSH_PORT),
        "UPLOADS_DIR": UPLOADS_DIR,
        "OUTPUTS_DIR": OUTPUTS_DIR,
        # Where nginx serves OUTPUTS_DIR from, only to a backend's X-Accel-Redirect.
        "OUTPUTS_INTERNAL_PREFIX": OUTPUTS_INTERNAL_PREFIX,
        # The same limits as nginx's: the app holds to them when reached some other way.
        "MAX_UPLOAD_BYTES": str(settings.nginx.max_body_size_mb * 1024 * 1024),
        "MAX_JSON_BYTES": str(API_MAX_BODY_KB * 1024),
        "MAX_JOB_SECONDS": str(backend.max_job_seconds),
        "MAX_ACTIVE_JOBS_PER_TOKEN": str(backend.max_active_jobs_per_token),
        "MIN_FREE_DISK_BYTES": str(backend.min_free_disk),
        "UPLOAD_RETENTION_HOURS": str(backend.upload_retention_hours),
        "OUTPUT_RETENTION_HOURS": str(backend.output_retention_hours),
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
def _proxy_to_backends(read_timeout_seconds: int) -> str:
    return _PROXY_TO_BACKENDS.replace("READ_TIMEOUT", f"{read_timeout_seconds}s")


# An API answer takes the backend a few seconds at most (each dependency is bounded by
# DEPENDENCY_TIMEOUT_SECONDS): a request that waits longer is on a backend that is gone (its
# node lost, its packets dropped, on a kept-alive connection that no connect timeout covers),
# and a GET is retried on the next backend after this. An upload's answer waits for its body.
API_READ_TIMEOUT_SECONDS = 10
UPLOAD_READ_TIMEOUT_SECONDS = 300
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
            proxy_read_timeout READ_TIMEOUT;
            proxy_request_buffering off;"""

# Bodies other than uploads are small JSON documents.
API_MAX_BODY_KB = 64
# Only with TLS on: browsers then refuse plain HTTP to this host for a year.
HSTS = """
        add_header Strict-Transport-Security "max-age=31536000" always;"""

# What nginx itself answers, as the API answers: a JSON reason, nothing about the server.
NGINX_ERRORS: dict[int, str] = {
    400: "bad request",
    403: "forbidden",
    404: "not found",
    405: "method not allowed",
    408: "the request was not sent in time",
    413: "request body too large",
    429: "too many requests or connections from this address: slow down",
    500: "internal error",
    502: "no backend could answer",
    504: "the backend did not answer in time",
}


def _error_pages() -> str:
    pages = []
    for status, reason in sorted(NGINX_ERRORS.items()):
        pages.append(
            f"""error_page {status} @error_{status};
        location @error_{status} {{
            default_type application/json;
            return {status} '{json.dumps({"error": reason})}\\n';
        }}"""
        )
    return "\n\n        ".join(pages)


def _cluster_only(settings: Settings) -> str:
    """Allow the cluster's own networks; the bridge gateway is how the host (and anything
    published) reaches nginx, so it is refused first."""
    gateway = settings.network.edge_subnet.network_address + 1
    return f"""deny {gateway};
            allow 127.0.0.1;
            allow {settings.network.edge_subnet};
            deny all;"""


def nginx_conf(settings: Settings) -> str:
    """The load balancer: /api/ to every backend, results from the shared volume.

    The upstream's servers are not in this file: the entrypoint writes them to
    NGINX_UPSTREAMS_FILE from the backends alias and reloads nginx when they change, so
    scaling the pool changes neither this file nor the nginx container. Results are not
    served to clients directly: a backend checks the token or signed link and answers with
    X-Accel-Redirect into the internal location. Each client address has a request rate
    (excess delayed up to a burst, then 429) and a connection cap. With TLS, the HTTP port
    only redirects to HTTPS (and answers the container's own healthcheck).
    """
    ngx = settings.nginx
    burst = f" burst={ngx.request_burst}" if ngx.request_burst else ""
    rate_limited = f"limit_req zone=per_client{burst};"
    local = f"""location = /health {{
            access_log off;
            default_type text/plain;
            return 200 "ok\\n";
        }}

        location = /nginx-status {{
            stub_status;
            {_cluster_only(settings)}
        }}

        {_error_pages()}"""
    service = f"""client_max_body_size {API_MAX_BODY_KB}k;
        add_header X-Content-Type-Options nosniff always;
        add_header X-Frame-Options DENY always;
        add_header Referrer-Policy no-referrer always;{HSTS if settings.tls_enabled else ""}
        limit_conn per_client_connections {ngx.connections_per_client};

        {local}

        location / {{
            return 404;
        }}

        location {OUTPUTS_INTERNAL_PREFIX} {{
            internal;
            alias {OUTPUTS_DIR}/;
            autoindex off;
        }}

        # Readiness names every dependency: for the cluster (and a token), not for clients.
        location = /api/health {{
            {_cluster_only(settings)}
            {_proxy_to_backends(API_READ_TIMEOUT_SECONDS)}
        }}

        location = /api/uploads {{
            client_max_body_size {ngx.max_body_size_mb}m;
            {rate_limited}
            {_proxy_to_backends(UPLOAD_READ_TIMEOUT_SECONDS)}
        }}

        location /api/ {{
            {rate_limited}
            {_proxy_to_backends(API_READ_TIMEOUT_SECONDS)}
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

    # A client gets this long for its whole request line and headers; a body may pause at
    # most client_body_timeout between two reads (the backend also cuts off one that
    # trickles); an idle keep-alive connection is closed after keepalive_timeout.
    client_header_timeout 10s;
    client_body_timeout 30s;
    send_timeout 60s;
    keepalive_timeout 30s;
    large_client_header_buffers 4 8k;

    limit_req_zone $binary_remote_addr zone=per_client:10m rate={ngx.requests_per_second}r/s;
    limit_conn_zone $binary_remote_addr zone=per_client_connections:10m;
    limit_req_status 429;
    limit_conn_status 429;

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
        "postgres/pg_ident.conf": pg_ident_conf(),
        "postgres/primary-setup.sql": primary_setup_sql(),
        "postgres/pgbackrest.conf": pgbackrest_conf(settings),
        "postgres/postgresql.conf": postgresql_conf(settings),
        "postgres/patroni-dcs.json": patroni_dcs_json(settings),
        "nginx/nginx.conf": nginx_conf(settings),
        "backend/environment": "".join(f"{k}={v}\n" for k, v in sorted(backend_environment(settings).items())),
        "mpi/hostfile": hostfile(settings),
        "mpi/known_hosts": known_hosts(settings, keys),
        "mpi/openmpi-mca-params.conf": openmpi_mca_params(settings),
        "mpi/prte-mca-params.conf": prte_mca_params(settings),
    }
    for pg_node in topo.postgres_nodes:
        files[f"postgres/{pg_node.hostname}.patroni.yml"] = patroni_yml(settings, pg_node)
    for etcd_node in topo.etcd_nodes:
        files[f"postgres/{etcd_node.hostname}.etcd.yml"] = etcd_yml(settings, etcd_node)
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
        secrets_set = frozenset(k for k in SECRET_KEYS if isinstance(raw.get(k), dict))
        settings = parse(args.stack, raw, secrets_set=secrets_set)
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
