"""Stack settings: the one place that reads configuration.

`load()` turns `pulumi.Config("transvidio")` into frozen, validated dataclasses;
`parse()` does the same from plain values (a stack file read by `components.render`,
or a test), so both paths share every rule. Every error names the key, the value
and what is allowed, and is raised before any resource is registered.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

PROJECT = "transvidio"


class SettingsError(ValueError):
    """A configuration value is wrong; the message says which, and what is allowed."""


# --- value parsers --------------------------------------------------------------------

Parser = Callable[[str, Any], Any]

_SIZE_RE = re.compile(r"^(\d+)\s*([kmgt]?)b?$", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
# Docker's reference grammar, simplified: [registry[:port]/]path[:tag][@digest]. Every
# pattern here is matched whole (fullmatch): `$` alone would also accept a trailing newline.
_IMAGE_RE = re.compile(
    r"^(?:[a-z0-9]+(?:[._-][a-z0-9]+)*(?::\d+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$"
)


def _fail(key: str, value: Any, allowed: str) -> SettingsError:
    return SettingsError(f"{PROJECT}:{key}={value!r}: {allowed}")


def integer(low: int, high: int) -> Parser:
    def parse(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise _fail(key, value, f"must be a whole number from {low} to {high}")
        try:
            number = int(value)
        except ValueError:
            raise _fail(key, value, f"must be a whole number from {low} to {high}") from None
        if not low <= number <= high:
            raise _fail(key, value, f"must be a whole number from {low} to {high}")
        return number

    return parse


def optional_port(key: str, value: Any) -> int | None:
    """A host port, or 0/null for 'not published'."""
    if value in (None, 0, "0", ""):
        return None
    result: int = integer(1, 65535)(key, value)
    return result


def odd_count(low: int, high: int) -> Parser:
    """An odd whole number: a majority of an odd count survives losing the same number as one more."""

    def parse(key: str, value: Any) -> int:
        number: int = integer(low, high)(key, value)
        if number % 2 == 0:
            raise _fail(key, value, f"must be odd, from {low} to {high} (a majority must survive a loss)")
        return number

    return parse


def boolean(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _fail(key, value, "must be true or false")


def size_bytes(key: str, value: Any) -> int:
    """'512MB', '1gb', '256m', '64k' or a number of bytes."""
    match = _SIZE_RE.fullmatch(str(value).strip())
    if not match or int(match.group(1)) == 0:
        raise _fail(key, value, "must be a size such as 256MB, 1GB or 512m")
    return int(match.group(1)) * _SIZE_FACTORS[match.group(2).lower()]


def megabytes(minimum: int) -> Parser:
    def parse(key: str, value: Any) -> int:
        mb = size_bytes(key, value) // 1024**2
        if mb < minimum:
            raise _fail(key, value, f"must be at least {minimum}MB")
        return mb

    return parse


def choice(*allowed: str) -> Parser:
    def parse(key: str, value: Any) -> str:
        if value not in allowed:
            raise _fail(key, value, "must be one of " + ", ".join(allowed))
        return str(value)

    return parse


def image_reference(key: str, value: Any) -> str:
    if not isinstance(value, str) or not _IMAGE_RE.fullmatch(value):
        raise _fail(key, value, "must be an image reference such as debian:trixie-slim")
    return value


def optional_image_reference(key: str, value: Any) -> str | None:
    return None if value in (None, "") else image_reference(key, value)


def subnet(key: str, value: Any) -> ipaddress.IPv4Network:
    try:
        network = ipaddress.IPv4Network(str(value), strict=True)
    except ValueError:
        raise _fail(key, value, "must be an IPv4 subnet in CIDR form such as 10.210.1.0/24") from None
    if not network.is_private:
        raise _fail(key, value, "must be a private subnet (10/8, 172.16/12 or 192.168/16)")
    return network


def ip_address(key: str, value: Any) -> str:
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ValueError:
        raise _fail(key, value, "must be an IPv4 address such as 127.0.0.1 or 0.0.0.0") from None


_RESTORE_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d{1,6})?[+-]\d{2}(:?\d{2})?$")


def restore_target(key: str, value: Any) -> str:
    """'' (no restore), 'latest', or a time with its UTC offset, as PostgreSQL reads it."""
    if value in (None, "", "latest"):
        return value or ""
    if isinstance(value, str) and _RESTORE_TIME_RE.fullmatch(value):
        try:
            datetime.datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            return value
    raise _fail(key, value, "must be empty, latest, or a time with its UTC offset such as '2026-11-29 14:05:00+00'")


_CPUS_RE = re.compile(r"^(\d{1,2})(?:\.(\d{1,2}))?$")
MAX_CPUS = 64


def provider_cpus(millicpus: int) -> str:
    """A CPU limit as the Docker provider reads it back (terraform-provider-docker's
    nanoInt64ToDecimalString: "1.0", "0.5", "2.25"), so the next `pulumi up` sees no change."""
    if millicpus <= 0:
        raise ValueError(f"a CPU limit must be positive, not {millicpus}")
    whole, thousandths = divmod(millicpus, 1000)
    nine_decimals = f"{whole}.{thousandths:03d}000000"
    if nine_decimals.count("0") == 9:
        # big.Rat.FloatString(1): one decimal, a half rounded away from zero.
        tenths = (millicpus + 50) // 100
        return f"{tenths // 10}.{tenths % 10}"
    return nine_decimals.rstrip("0")


def cpus(key: str, value: Any) -> int:
    """A CPU limit such as 0.5, 1 or 2.25, in thousandths of a CPU."""
    allowed = f"must be a number of CPUs from 0.1 to {MAX_CPUS}, at most two decimals, such as 0.5 or 2"
    match = _CPUS_RE.fullmatch(str(value).strip()) if isinstance(value, (int, float, str)) else None
    if isinstance(value, bool) or not match:
        raise _fail(key, value, allowed)
    whole, fraction = match.group(1), (match.group(2) or "").ljust(3, "0")
    millicpus = int(whole) * 1000 + int(fraction)
    if not 100 <= millicpus <= MAX_CPUS * 1000:
        raise _fail(key, value, allowed)
    # The provider reads a few values back rounded (10.05 as "10.1"): every `pulumi up`
    # would then plan a replacement. Refuse them, naming the value that works.
    shown = provider_cpus(millicpus)
    back_whole, _, back_fraction = shown.partition(".")
    if int(back_whole) * 1000 + int((back_fraction + "000")[:3]) != millicpus:
        raise _fail(key, value, f"is read back by the Docker provider as {shown}: use {shown} (or another value)")
    return millicpus


_TOKEN_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
MAX_API_TOKENS = 8


def _names(key: str, value: Any, pattern: re.Pattern[str], low: int, high: int, allowed: str) -> tuple[str, ...]:
    """A list of `low` to `high` distinct names, each matching `pattern`."""
    if not isinstance(value, (list, tuple)) or not low <= len(value) <= high:
        raise _fail(key, value, allowed)
    if len(set(value)) != len(value) or not all(isinstance(v, str) and pattern.fullmatch(v) for v in value):
        raise _fail(key, value, allowed)
    return tuple(value)


def token_names(key: str, value: Any) -> tuple[str, ...]:
    """Names of the API tokens the stack generates: 1 to 8 distinct lower-case names."""
    allowed = (
        f"must be a list of 1 to {MAX_API_TOKENS} distinct names of lower-case letters, digits and '-', "
        'starting with a letter, such as ["default"]'
    )
    return _names(key, value, _TOKEN_NAME_RE, 1, MAX_API_TOKENS, allowed)


_REDIS_BACKUP_RE = re.compile(r"redis-\d{8}T\d{6}Z\.rdb")


def redis_backup_name(key: str, value: Any) -> str:
    """'' (no restore), 'latest', or the name of a backup as the backup job writes it."""
    if value in (None, "", "latest"):
        return value or ""
    if isinstance(value, str) and _REDIS_BACKUP_RE.fullmatch(value):  # whole: no trailing newline
        return value
    raise _fail(key, value, "must be empty, latest, or a backup's name such as redis-20261201T120000Z.rdb")


_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_REGION_RE = re.compile(r"[a-z0-9-]{1,32}")


def optional_endpoint(key: str, value: Any) -> str:
    """'' or host[:port] of an S3-compatible endpoint (TLS: pgBackRest speaks only HTTPS to S3)."""
    if value in (None, ""):
        return ""
    host, _, port = str(value).partition(":")
    if not _HOST_RE.fullmatch(host) or (port and not (port.isdigit() and 1 <= int(port) <= 65535)):
        raise _fail(
            key, value, "must be a host name or address, optionally with :port, such as s3.eu-west-1.amazonaws.com"
        )
    return str(value)


def optional_bucket(key: str, value: Any) -> str:
    if value in (None, ""):
        return ""
    if not isinstance(value, str) or not _BUCKET_RE.fullmatch(value) or ".." in value:
        raise _fail(key, value, "must be an S3 bucket name: 3 to 63 lower-case letters, digits, '.' and '-'")
    return value


def region(key: str, value: Any) -> str:
    if not isinstance(value, str) or not _REGION_RE.fullmatch(value):
        raise _fail(key, value, "must be a region name such as us-east-1")
    return value


_SWARM_NODE_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")
MAX_SWARM_NODES = 16


def swarm_node_names(key: str, value: Any) -> tuple[str, ...]:
    """The values of the `transvidio.node` label on the swarm's nodes, in placement order."""
    allowed = (
        f"must be a list of up to {MAX_SWARM_NODES} distinct node labels of lower-case letters, digits and '-', "
        'such as ["n1", "n2", "n3"]'
    )
    return _names(key, value, _SWARM_NODE_RE, 0, MAX_SWARM_NODES, allowed)


def optional_registry(key: str, value: Any) -> str:
    """'' or host[:port] of the registry a swarm's nodes pull the stack's images from."""
    try:
        return optional_endpoint(key, value)
    except SettingsError:
        raise _fail(
            key, value, "must be a registry host, optionally with :port, such as registry.example:5000"
        ) from None


def optional_absolute_path(key: str, value: Any) -> str:
    if value in (None, ""):
        return ""
    if not isinstance(value, str) or not re.fullmatch(r"(/[A-Za-z0-9._-]+)+", value):
        raise _fail(
            key, value, "must be an absolute path of letters, digits, '.', '_' and '-', such as /srv/transvidio"
        )
    return value


def worker_processes(key: str, value: Any) -> str:
    if value == "auto":
        return "auto"
    return str(integer(1, 64)(key, value))


def _setting(config_key: str, default: Any, parse: Parser, doc: str) -> Any:
    """A dataclass field read from `config_key`; `doc` feeds the README's reference."""
    return field(metadata={"key": config_key, "default": default, "parse": parse, "doc": doc})


# --- sections -------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkSettings:
    """The two bridge networks and where published ports bind."""

    edge_subnet: ipaddress.IPv4Network = _setting(
        "edgeSubnet", "10.211.0.0/24", subnet, "Subnet of the edge network (nginx, backends)."
    )
    data_subnet: ipaddress.IPv4Network = _setting(
        "dataSubnet", "10.211.1.0/24", subnet, "Subnet of the data network (databases, Redis, MPI, backends)."
    )
    data_internal: bool = _setting(
        "dataInternal", True, boolean, "Make the data network internal (no route out, no published ports)."
    )
    publish_host_ip: str = _setting(
        "publishHostIp", "0.0.0.0", ip_address, "Host address every published port binds to."
    )
    egress_subnet: ipaddress.IPv4Network = _setting(
        "egressSubnet",
        "10.211.3.0/24",
        subnet,
        "Subnet of the egress network: the PostgreSQL nodes' route to an S3 backup repository (only then).",
    )


@dataclass(frozen=True)
class ImageSettings:
    """Where the images come from."""

    base: str = _setting("base", "debian:trixie-slim", image_reference, "Debian base every role's image is built FROM.")
    backend: str | None = _setting(
        "backend", "", optional_image_reference, "A user's backend image; unset builds images/backend."
    )
    registry: str = _setting(
        "registry",
        "",
        optional_registry,
        "Registry (host[:port]) the built images are pushed to and a swarm's nodes pull from, by digest.",
    )


TARGETS = ("containers", "swarm")


@dataclass(frozen=True)
class DeploySettings:
    """Where the stack runs: containers on one Docker host, or services on a Docker Swarm."""

    target: str = _setting(
        "target", "containers", choice(*TARGETS), "containers (one Docker host) or swarm (services on a swarm)."
    )
    swarm_nodes: tuple[str, ...] = _setting(
        "swarmNodes",
        [],
        swarm_node_names,
        "swarm: the nodes' transvidio.node labels; stateful services are pinned and spread over them in order.",
    )
    endpoint_mode: str = _setting(
        "endpointMode", "vip", choice("vip", "dnsrr"), "swarm: how a service name resolves (vip, or dnsrr: its tasks)."
    )
    publish_mode: str = _setting(
        "publishMode",
        "ingress",
        choice("ingress", "host"),
        "swarm: how nginx publishes (ingress: the routing mesh; host: on each node running nginx).",
    )
    encrypt_overlay: bool = _setting(
        "encryptOverlay", False, boolean, "swarm: encrypt the overlay networks' traffic (IPsec between nodes)."
    )
    shared_path: str = _setting(
        "sharedPath",
        "",
        optional_absolute_path,
        "swarm: a directory of storage every node mounts (uploads, outputs, the MPI workspace and backups live there).",
    )

    @property
    def swarm(self) -> bool:
        return self.target == "swarm"


# The most PostgreSQL replicas a stack may have: the primary's slot and sender limits are
# sized for it once, so scaling replicas never changes (and so never restarts) the primary.
MAX_POSTGRES_REPLICAS = 8
# The shortest early failover: Patroni's shortest loop (1 s) and retry (3 s), plus a second in
# which a primary that could not renew its lock has demoted itself.
MIN_FAILOVER_DETECT_SECONDS = 5


@dataclass(frozen=True)
class PostgresSettings:
    """PostgreSQL nodes under Patroni (one primary, streaming replicas) and their etcd."""

    replica_count: int = _setting("replicas", 2, integer(0, MAX_POSTGRES_REPLICAS), "Streaming replicas.")
    consensus_nodes: int = _setting(
        "consensusNodes", 3, odd_count(1, 5), "etcd nodes holding Patroni's leader lock (1, 3 or 5; set at creation)."
    )
    synchronous: bool = _setting(
        "synchronous", False, boolean, "Commit waits for the synchronous standby: no acknowledged write lost."
    )
    failover_ttl_seconds: int = _setting(
        "failoverTtlSeconds",
        20,
        integer(20, 300),
        "Patroni's leader lock TTL: how long a primary that is silent but still answers is waited for.",
    )
    failover_detect_seconds: int = _setting(
        "failoverDetectSeconds",
        5,
        integer(0, 299),
        "Seconds a primary that renews no lock and answers on no port keeps it; 0: its TTL. 5 to TTL - 1.",
    )
    shared_buffers: int = _setting("sharedBuffers", "512MB", size_bytes, "shared_buffers.")
    work_mem: int = _setting("workMem", "32MB", size_bytes, "work_mem.")
    maintenance_work_mem: int = _setting("maintenanceWorkMem", "128MB", size_bytes, "maintenance_work_mem.")
    max_slot_wal_keep_size: int = _setting(
        "maxSlotWalKeepSize", "1GB", size_bytes, "WAL a lost replica's slot may pin before it is invalidated."
    )
    memory_mb: int = _setting("memory", "1GB", megabytes(128), "Memory limit per PostgreSQL container.")
    millicpus: int = _setting("cpus", 2, cpus, "CPU limit per PostgreSQL container.")
    shm_size_mb: int = _setting("shmSize", "256MB", megabytes(64), "/dev/shm size per PostgreSQL container.")
    publish_port: int | None = _setting(
        "publishPort", 0, optional_port, "Host port of the primary; replicas take the next ones. 0: none."
    )
    backup_full_interval_minutes: int = _setting(
        "backupFullIntervalMinutes", 1440, integer(1, 44640), "Minutes between full base backups (pgBackRest)."
    )
    backup_incremental_interval_minutes: int = _setting(
        "backupIncrementalIntervalMinutes",
        60,
        integer(0, 44640),
        "Minutes between incremental backups; 0: none. Must be shorter than the full interval.",
    )
    backup_retention_full: int = _setting(
        "backupRetentionFull", 7, integer(1, 365), "Full backups kept, with their incrementals and WAL."
    )
    archive_timeout_seconds: int = _setting(
        "archiveTimeoutSeconds",
        60,
        integer(10, 3600),
        "Longest a committed write waits to reach the backup repository: the data lost with every volume.",
    )
    restore_target: str = _setting(
        "restoreTarget",
        "",
        restore_target,
        "Restore an empty primary from the repository: latest, or a time with its UTC offset. Empty: never.",
    )
    backup_repository: str = _setting(
        "backupRepository", "volume", choice("volume", "s3"), "Where backups and the WAL archive go: volume, or s3."
    )
    s3_endpoint: str = _setting(
        "s3Endpoint", "", optional_endpoint, "S3 endpoint host, or host:port (backupRepository s3)."
    )
    s3_bucket: str = _setting("s3Bucket", "", optional_bucket, "S3 bucket (backupRepository s3).")
    s3_region: str = _setting("s3Region", "us-east-1", region, "S3 region.")
    s3_uri_style: str = _setting(
        "s3UriStyle", "host", choice("host", "path"), "S3 addressing: host (bucket.endpoint) or path (endpoint/bucket)."
    )


@dataclass(frozen=True)
class RedisSettings:
    """Redis data nodes and Sentinels."""

    replica_count: int = _setting("replicas", 2, integer(1, 8), "Redis replicas of the master.")
    sentinel_count: int = _setting("sentinels", 3, integer(1, 7), "Sentinels (3 or more in prod).")
    quorum: int = _setting("quorum", 2, integer(1, 7), "Sentinels that must agree the master is down.")
    down_after_ms: int = _setting(
        "downAfterMs", 5000, integer(500, 600000), "Silence before a Sentinel calls a node down."
    )
    failover_timeout_ms: int = _setting(
        "failoverTimeoutMs", 60000, integer(1000, 3600000), "Sentinel failover-timeout."
    )
    maxmemory: int = _setting("maxmemory", "1GB", size_bytes, "Redis maxmemory.")
    maxmemory_policy: str = _setting(
        "maxmemoryPolicy",
        "allkeys-lru",
        choice("noeviction", "allkeys-lru", "allkeys-lfu", "volatile-lru", "volatile-lfu", "volatile-ttl"),
        "Eviction policy at maxmemory.",
    )
    min_replicas_to_write: int = _setting(
        "minReplicasToWrite", 1, integer(0, 8), "Replicas a master needs to accept writes."
    )
    min_replicas_max_lag: int = _setting(
        "minReplicasMaxLag", 10, integer(1, 3600), "Seconds of replica silence that stop writes."
    )
    memory_mb: int = _setting("memory", "1536MB", megabytes(64), "Memory limit per Redis data node.")
    sentinel_memory_mb: int = _setting("sentinelMemory", "64MB", megabytes(32), "Memory limit per Sentinel.")
    millicpus: int = _setting("cpus", 1, cpus, "CPU limit per Redis data node.")
    sentinel_millicpus: int = _setting("sentinelCpus", 0.25, cpus, "CPU limit per Sentinel.")
    backup_interval_minutes: int = _setting(
        "backupIntervalMinutes",
        60,
        integer(0, 44640),
        "Minutes between copies of the data set to the backups; 0: none.",
    )
    backup_retention: int = _setting("backupRetention", 48, integer(1, 1000), "Redis backups kept.")
    restore_from: str = _setting(
        "restoreFrom",
        "",
        redis_backup_name,
        "Restore an empty group from a backup: latest, or a backup's name. Empty: never.",
    )
    publish_port: int | None = _setting(
        "publishPort", 0, optional_port, "Host port of node 0; the other nodes take the next ones. 0: none."
    )
    sentinel_publish_port: int | None = _setting(
        "sentinelPublishPort", 0, optional_port, "Host port of Sentinel 1; the others take the next. 0: none."
    )


@dataclass(frozen=True)
class MpiSettings:
    """Open MPI master and workers."""

    worker_count: int = _setting("workers", 2, integer(1, 16), "MPI workers besides the master.")
    slots_per_node: int = _setting("slotsPerNode", 1, integer(1, 64), "MPI slots per node in the hostfile.")
    memory_mb: int = _setting("memory", "2GB", megabytes(128), "Memory limit per MPI node.")
    millicpus: int = _setting("cpus", 2, cpus, "CPU limit per MPI node.")


@dataclass(frozen=True)
class BackendSettings:
    """The application servers behind nginx."""

    replica_count: int = _setting("replicas", 3, integer(1, 20), "Backend containers.")
    memory_mb: int = _setting("memory", "1GB", megabytes(128), "Memory limit per backend.")
    millicpus: int = _setting("cpus", 1, cpus, "CPU limit per backend.")
    api_tokens: tuple[str, ...] = _setting(
        "apiTokens",
        ["default"],
        token_names,
        "Names of the API's bearer tokens, one generated secret each (output apiTokens); rename one to rotate it.",
    )
    max_job_seconds: int = _setting(
        "maxJobSeconds", 36000, integer(1, 86400), "Longest video a job may ask for (duration_seconds)."
    )
    max_active_jobs_per_token: int = _setting(
        "maxActiveJobsPerToken", 20, integer(1, 10000), "Jobs a token may have queued or running at once (then 429)."
    )
    min_free_disk: int = _setting(
        "minFreeDisk", "1GB", size_bytes, "Free space an upload must leave on the uploads volume (else 507)."
    )
    upload_retention_hours: int = _setting(
        "uploadRetentionHours",
        168,
        integer(1, 87600),
        "Hours an upload is kept (a partial one, an hour after its last byte).",
    )
    output_retention_hours: int = _setting(
        "outputRetentionHours", 168, integer(1, 87600), "Hours a job's result is kept (then 410 Gone)."
    )


@dataclass(frozen=True)
class NginxSettings:
    """The load balancer."""

    worker_processes: str = _setting("workerProcesses", "4", worker_processes, "nginx worker_processes.")
    worker_connections: int = _setting("workerConnections", 2048, integer(64, 65535), "nginx worker_connections.")
    http_port: int = _setting("httpPort", 80, integer(1, 65535), "Host port for HTTP.")
    https_port: int | None = _setting(
        "httpsPort", 0, optional_port, "Host port for HTTPS (needs tlsCertificate and tlsKey). 0: none."
    )
    max_body_size_mb: int = _setting("maxBodySize", "500MB", megabytes(1), "Largest upload accepted.")
    memory_mb: int = _setting("memory", "256MB", megabytes(32), "Memory limit of the nginx container.")
    millicpus: int = _setting("cpus", 1, cpus, "CPU limit of the nginx container.")
    requests_per_second: int = _setting(
        "requestsPerSecond", 50, integer(1, 100000), "API requests per second per client address (excess delayed)."
    )
    request_burst: int = _setting(
        "requestBurst", 40, integer(0, 100000), "API requests a client may queue above its rate (beyond: 429)."
    )
    connections_per_client: int = _setting(
        "connectionsPerClient", 64, integer(1, 65535), "Open connections per client address (beyond: 429)."
    )


SECTIONS: dict[str, type] = {
    "deploy": DeploySettings,
    "network": NetworkSettings,
    "images": ImageSettings,
    "postgres": PostgresSettings,
    "redis": RedisSettings,
    "mpi": MpiSettings,
    "backend": BackendSettings,
    "nginx": NginxSettings,
}

# Secret keys: `pulumi config set --secret KEY VALUE` replaces the generated value.
SECRET_KEYS: dict[str, str] = {
    "postgresPassword": "PostgreSQL superuser password (generated when unset).",
    "replicationPassword": "PostgreSQL replication role password (generated when unset).",
    "rewindPassword": "PostgreSQL pg_rewind role password (generated when unset).",
    "patroniApiPassword": "Patroni REST API password: switchover, restart, config (generated when unset).",
    "appDbPassword": "PostgreSQL application role password (generated when unset).",
    "redisPassword": "Redis password of the application user app (generated when unset).",
    "redisReplicationPassword": "Redis user replica: replication, and nodes asking Sentinels (generated when unset).",
    "redisSentinelPassword": "Redis user sentinel: the Sentinels on the nodes and each other (generated when unset).",
    "redisAdminPassword": "Redis user admin, for operators, on every node and Sentinel (generated when unset).",
    "secretKey": "Backend SECRET_KEY (generated when unset).",
    "tlsCertificate": "PEM certificate chain for nginx HTTPS (optional).",
    "tlsKey": "PEM private key for nginx HTTPS (optional).",
    "s3AccessKeyId": "S3 access key id for the PostgreSQL backup repository (postgres.backupRepository s3).",
    "s3SecretAccessKey": "S3 secret access key for the PostgreSQL backup repository (postgres.backupRepository s3).",
    "s3CaCertificate": "PEM certificate of the CA that signed the S3 endpoint's certificate (optional).",
}


def defaults(section: str) -> dict[str, Any]:
    """The section's defaults keyed by config key, as Pulumi.yaml declares them."""
    return {f.metadata["key"]: f.metadata["default"] for f in dataclasses.fields(SECTIONS[section])}


@dataclass(frozen=True)
class Settings:
    """Everything the program needs, validated."""

    project: str
    stack: str
    deploy: DeploySettings
    network: NetworkSettings
    images: ImageSettings
    postgres: PostgresSettings
    redis: RedisSettings
    mpi: MpiSettings
    backend: BackendSettings
    nginx: NginxSettings
    tls_enabled: bool
    # The secret keys set with `pulumi config set --secret` (their values are not here).
    secrets_set: frozenset[str] = frozenset()

    @property
    def prefix(self) -> str:
        """Prefix of every Docker name, so stacks coexist on one host."""
        return f"{self.project}-{self.stack}"

    @property
    def is_production(self) -> bool:
        return self.stack == "prod" or self.stack.startswith("prod-")


def _parse_section(section: str, raw: Any) -> Any:
    cls = SECTIONS[section]
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise _fail(section, raw, "must be an object, e.g. `pulumi config set --path " + section + ".<key> VALUE`")
    fields = {f.metadata["key"]: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise SettingsError(
            f"{PROJECT}:{section}.{unknown[0]} is not a setting of {section}; allowed keys: {', '.join(sorted(fields))}"
        )
    values = {}
    for key, spec in fields.items():
        value = raw.get(key, spec.metadata["default"])
        values[spec.name] = spec.metadata["parse"](f"{section}.{key}", value)
    return cls(**values)


# Fixed host offsets per role in the data and edge subnets: scaling one role never moves
# another role's address, so nothing else is replaced and nobody holds a stale IP.
ADDRESS_BLOCKS: dict[str, tuple[int, int]] = {
    "postgres": (10, 9),  # the bootstrapping node .10, the others .11-.18
    "etcd": (60, 5),  # .60-.64
    "redis": (20, 9),  # node 0 .20 (initial master), replicas .21-.28
    "redis-backup": (29, 1),
    "sentinel": (30, 7),  # .30-.36
    "mpi": (40, 17),  # master .40, workers .41-.56
    "nginx": (90, 1),
    "backend": (100, 20),  # .100-.119
}


def _role_sizes(s: Settings) -> dict[str, int]:
    return {
        "postgres": 1 + s.postgres.replica_count,
        "etcd": s.postgres.consensus_nodes,
        "redis": 1 + s.redis.replica_count,
        "redis-backup": 1 if s.redis.backup_interval_minutes else 0,
        "sentinel": s.redis.sentinel_count,
        "mpi": 1 + s.mpi.worker_count,
        "nginx": 1,
        "backend": s.backend.replica_count,
    }


def _check_subnet(key: str, network: ipaddress.IPv4Network, roles: dict[str, int]) -> None:
    highest_role, highest = max(
        ((role, ADDRESS_BLOCKS[role][0] + count - 1) for role, count in roles.items()), key=lambda item: item[1]
    )
    # The last address is the broadcast address; .1 is the gateway.
    if highest >= network.num_addresses - 1:
        raise _fail(
            key,
            str(network),
            f"holds host offsets 1-{network.num_addresses - 2}, but {highest_role} needs offset {highest}: "
            "use a /25 or larger",
        )


def _published_ports(s: Settings) -> list[tuple[int, str]]:
    ports: list[tuple[int, str]] = [(s.nginx.http_port, "nginx.httpPort")]
    if s.nginx.https_port:
        ports.append((s.nginx.https_port, "nginx.httpsPort"))
    ranges = [
        (s.postgres.publish_port, 1 + s.postgres.replica_count, "postgres.publishPort"),
        (s.redis.publish_port, 1 + s.redis.replica_count, "redis.publishPort"),
        (s.redis.sentinel_publish_port, s.redis.sentinel_count, "redis.sentinelPublishPort"),
    ]
    for first, count, key in ranges:
        if first:
            if first + count - 1 > 65535:
                raise _fail(key, first, f"needs {count} ports from there, past 65535")
            ports.extend((first + offset, key) for offset in range(count))
    return ports


def spread_index(position: int, node_count: int) -> int:
    """The swarm node (its index in deploy.swarmNodes) a role's `position`-th member is pinned to:
    round-robin, so the members of one role are on as many nodes as there are."""
    return position % node_count


def _survivors_after_losing_a_node(count: int, node_count: int) -> int:
    """Members of a role left when the node holding the most of them is lost."""
    return count - max(sum(1 for i in range(count) if spread_index(i, node_count) == n) for n in range(node_count))


MIN_SWARM_NODES = 3


def _validate_swarm(s: Settings) -> None:
    d = s.deploy
    if len(d.swarm_nodes) < MIN_SWARM_NODES:
        raise _fail(
            "deploy.swarmNodes",
            list(d.swarm_nodes),
            f"deploy.target=swarm needs at least {MIN_SWARM_NODES} nodes (the transvidio.node label of each), so "
            "that losing one keeps a majority of Sentinels and etcd members",
        )
    for key, what in (("images.registry", s.images.registry), ("deploy.sharedPath", d.shared_path)):
        if not what:
            needed = (
                "the registry every node pulls the stack's images from"
                if key == "images.registry"
                else "a directory on storage shared by every node (NFS, CephFS...), for uploads and outputs"
            )
            raise SettingsError(f"{PROJECT}:{key} is empty with deploy.target=swarm: set {needed}")
    for key, count in (
        ("postgres.consensusNodes", s.postgres.consensus_nodes),
        ("redis.sentinels", s.redis.sentinel_count),
    ):
        left = _survivors_after_losing_a_node(count, len(d.swarm_nodes))
        if left * 2 <= count:
            raise SettingsError(
                f"{PROJECT}:{key}={count} over {len(d.swarm_nodes)} swarm nodes: losing one node leaves {left}, "
                "not a majority; use at least 3, spread one per node"
            )
    data_ports = [key for _, key in _published_ports(s) if not key.startswith("nginx.")]
    if data_ports:
        raise SettingsError(
            f"{PROJECT}:{data_ports[0]} is set with deploy.target=swarm: a swarm publishes only nginx; set it to 0"
        )


def _validate(s: Settings) -> None:
    r = s.redis
    pg = s.postgres
    if s.deploy.swarm:
        _validate_swarm(s)
    if pg.backup_incremental_interval_minutes >= pg.backup_full_interval_minutes:
        raise SettingsError(
            f"{PROJECT}:postgres.backupIncrementalIntervalMinutes={pg.backup_incremental_interval_minutes} with "
            f"postgres.backupFullIntervalMinutes={pg.backup_full_interval_minutes}: incremental backups must come "
            "more often than full ones (or set 0 for none)"
        )
    detect = pg.failover_detect_seconds
    if detect and not MIN_FAILOVER_DETECT_SECONDS <= detect < pg.failover_ttl_seconds:
        raise SettingsError(
            f"{PROJECT}:postgres.failoverDetectSeconds={detect} with postgres.failoverTtlSeconds="
            f"{pg.failover_ttl_seconds}: must be 0 (wait for the TTL) or from {MIN_FAILOVER_DETECT_SECONDS} "
            "(a primary's loop and its 3 s retry, plus a second) to one less than the TTL"
        )
    if r.quorum > r.sentinel_count:
        raise SettingsError(
            f"{PROJECT}:redis.sentinels={r.sentinel_count} with quorum {r.quorum}: "
            "the quorum must be between 1 and the number of Sentinels"
        )
    if s.is_production and pg.consensus_nodes < 3:
        raise SettingsError(
            f"{PROJECT}:postgres.consensusNodes={pg.consensus_nodes} on stack {s.stack}: production needs at least 3 "
            "(with one etcd node, losing it stops every PostgreSQL failover)"
        )
    if s.is_production and r.sentinel_count < 3:
        raise SettingsError(
            f"{PROJECT}:redis.sentinels={r.sentinel_count} on stack {s.stack}: production needs at least 3 "
            "Sentinels (a failover needs a majority of them; fewer cannot survive losing one)"
        )
    if r.min_replicas_to_write > r.replica_count - 1:
        raise SettingsError(
            f"{PROJECT}:redis.minReplicasToWrite={r.min_replicas_to_write} with {r.replica_count} replicas: "
            f"must be at most {r.replica_count - 1} (redis.replicas - 1), or the master a failover promotes "
            "refuses every write while the old master is down"
        )
    if s.network.edge_subnet.overlaps(s.network.data_subnet):
        raise _fail(
            "network.dataSubnet", str(s.network.data_subnet), f"overlaps network.edgeSubnet={s.network.edge_subnet}"
        )
    sizes = _role_sizes(s)
    _check_subnet("network.dataSubnet", s.network.data_subnet, sizes)
    _check_subnet("network.edgeSubnet", s.network.edge_subnet, {"nginx": 1, "backend": sizes["backend"]})
    seen: dict[int, str] = {}
    for port, key in _published_ports(s):
        if port in seen:
            raise SettingsError(
                f"{PROJECT}:{key} publishes host port {port}, already published by {PROJECT}:{seen[port]}: "
                "every published port must be distinct"
            )
        seen[port] = key
    data_ports = [key for _, key in _published_ports(s) if not key.startswith("nginx.")]
    if data_ports and s.network.data_internal:
        raise SettingsError(
            f"{PROJECT}:{data_ports[0]} publishes a port while network.dataInternal=true: an internal network "
            "has no published ports; set network.dataInternal=false (dev only) or the port to 0"
        )
    if s.is_production and data_ports:
        raise SettingsError(
            f"{PROJECT}:{data_ports[0]} is set on stack {s.stack}: production publishes only nginx; set it to 0"
        )
    if s.tls_enabled and not s.nginx.https_port:
        raise SettingsError(
            f"{PROJECT}:nginx.httpsPort=0 with the secrets tlsCertificate and tlsKey set: nginx would have a "
            "certificate and no port to serve it on; set nginx.httpsPort (e.g. 443), or remove the secrets"
        )
    if pg.backup_repository == "s3":
        for key, value, what in (
            ("s3Endpoint", pg.s3_endpoint, "endpoint (host or host:port)"),
            ("s3Bucket", pg.s3_bucket, "bucket"),
        ):
            if not value:
                raise SettingsError(
                    f"{PROJECT}:postgres.{key} is empty with postgres.backupRepository=s3: set the S3 {what} "
                    "backups go to"
                )
        missing = [key for key in ("s3AccessKeyId", "s3SecretAccessKey") if key not in s.secrets_set]
        if missing:
            raise SettingsError(
                f"{PROJECT}:postgres.backupRepository=s3 needs the secret {missing[0]} "
                f"(`pulumi config set --secret {missing[0]} ...`)"
            )
        if s.network.egress_subnet.overlaps(s.network.edge_subnet) or s.network.egress_subnet.overlaps(
            s.network.data_subnet
        ):
            raise _fail(
                "network.egressSubnet",
                str(s.network.egress_subnet),
                f"overlaps network.edgeSubnet={s.network.edge_subnet} or network.dataSubnet={s.network.data_subnet}",
            )
    if s.nginx.https_port and not s.tls_enabled:
        raise SettingsError(
            f"{PROJECT}:nginx.httpsPort={s.nginx.https_port} needs the secrets tlsCertificate and tlsKey "
            "(`pulumi config set --secret tlsCertificate < cert.pem`)"
        )


TLS_SECRETS = frozenset({"tlsCertificate", "tlsKey"})


def parse(stack: str, raw: Mapping[str, Any], secrets_set: frozenset[str] = frozenset()) -> Settings:
    """Settings from plain config values keyed without the project prefix, and the names of
    the secret keys that are set (their values are not needed: they only switch features on,
    TLS when both of its files are set)."""
    unknown = sorted(set(raw) - set(SECTIONS) - set(SECRET_KEYS))
    if unknown:
        raise SettingsError(
            f"{PROJECT}:{unknown[0]} is not a setting; allowed keys: {', '.join(sorted([*SECTIONS, *SECRET_KEYS]))}"
        )
    sections = {name: _parse_section(name, raw.get(name)) for name in SECTIONS}
    settings = Settings(
        project=PROJECT, stack=stack, tls_enabled=secrets_set >= TLS_SECRETS, secrets_set=secrets_set, **sections
    )
    _validate(settings)
    return settings


# Passwords land in a pgpass file (':' separates fields), Redis and Sentinel configs (a
# newline starts a directive) and URLs ('@', '/', '?' end parts): URL-unreserved characters only.
_PASSWORD_RE = re.compile(r"^[A-Za-z0-9._~-]{16,128}$")
_SECRET_KEY_RE = re.compile(r"^[!-~]{32,256}$")  # printable, no whitespace
# S3 credentials go into a pgBackRest config file: no whitespace, so no line of their own.
_S3_KEY_ID_RE = re.compile(r"[A-Za-z0-9._-]{3,128}")
_S3_SECRET_RE = re.compile(r"[!-~]{8,256}")
_PEM_MARKERS = {
    "tlsCertificate": "-----BEGIN CERTIFICATE-----",
    "tlsKey": "PRIVATE KEY-----",
    "s3CaCertificate": "-----BEGIN CERTIFICATE-----",
}


def check_secret(key: str, value: str) -> None:
    """Refuses a secret override that would break a file or a URL; the message names the key,
    never the value."""
    if key in _PEM_MARKERS:
        if _PEM_MARKERS[key] not in value:
            raise SettingsError(f"{PROJECT}:{key} (secret, value not shown): must be PEM text ({_PEM_MARKERS[key]})")
    elif key == "s3AccessKeyId":
        if not _S3_KEY_ID_RE.fullmatch(value):
            raise SettingsError(
                f"{PROJECT}:{key} (secret, value not shown): must be 3 to 128 characters from A-Z a-z 0-9 . _ -"
            )
    elif key == "s3SecretAccessKey":
        if not _S3_SECRET_RE.fullmatch(value):
            raise SettingsError(
                f"{PROJECT}:{key} (secret, value not shown): must be 8 to 256 printable characters, no spaces"
            )
    elif key == "secretKey":
        if not _SECRET_KEY_RE.fullmatch(value):
            raise SettingsError(
                f"{PROJECT}:{key} (secret, value not shown): must be 32 to 256 printable characters, no spaces"
            )
    elif not _PASSWORD_RE.fullmatch(value):
        raise SettingsError(
            f"{PROJECT}:{key} (secret, value not shown): must be 16 to 128 characters from A-Z a-z 0-9 . _ ~ - "
            "(it goes into a pgpass file, server configs and URLs)"
        )


@dataclass(frozen=True)
class SecretOverrides:
    """Secrets set with `pulumi config set --secret`; None means 'generate it'."""

    values: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str) -> Any:
        return self.values.get(key)


def load() -> tuple[Settings, SecretOverrides]:
    """Read and validate the stack's configuration from Pulumi."""
    import pulumi

    config = pulumi.Config(PROJECT)
    # Top-level keys too, so a typo such as `transvidio:redsi` is an error, not a silent default.
    raw: dict[str, Any] = {
        key.split(":", 1)[1]: None for key in pulumi.runtime.get_config_env() if key.startswith(PROJECT + ":")
    }
    for name in SECTIONS:
        try:
            value = config.get_object(name)
        except pulumi.ConfigTypeError:
            raise _fail(name, config.get(name), "must be an object of settings") from None
        raw[name] = value
    overrides = {key: value for key in SECRET_KEYS if (value := config.get_secret(key)) is not None}
    for key in overrides:
        # The plain value, for the check only, at preview: it goes on only as the secret Output.
        check_secret(key, str(pulumi.runtime.get_config(f"{PROJECT}:{key}")))
    settings = parse(pulumi.get_stack(), raw, secrets_set=frozenset(overrides))
    return settings, SecretOverrides(overrides)
