"""The stack's outputs: endpoints and counts in the clear, DSNs and passwords as secrets."""

from __future__ import annotations

import pulumi

from components import render
from components.backend import BackendPool
from components.mpi import MpiCluster
from components.nginx import NginxLB
from components.postgres import PostgresReplicaSet
from components.redis import RedisSentinelGroup
from components.secrets import ClusterSecrets
from components.settings import Settings
from components.topology import POSTGRES_APP_USER, POSTGRES_DB, POSTGRES_PORT, REDIS_MASTER_NAME


def _dsn(hosts: list[str], password: pulumi.Input[str], query: str) -> pulumi.Output[str]:
    """A libpq URL over every node; `query` picks the node (the primary, or a standby)."""
    authority = ",".join(f"{host}:{POSTGRES_PORT}" for host in hosts)
    return pulumi.Output.secret(
        pulumi.Output.concat("postgresql://", POSTGRES_APP_USER, ":", password, f"@{authority}/{POSTGRES_DB}?{query}")
    )


def export_stack_outputs(
    settings: Settings,
    secrets: ClusterSecrets,
    postgres: PostgresReplicaSet,
    redis: RedisSentinelGroup,
    mpi: MpiCluster,
    backends: BackendPool,
    nginx: NginxLB,
) -> None:
    pulumi.export("url", nginx.url)
    pulumi.export(
        "endpoints",
        {
            "nginx": nginx.url,
            # Any node may be primary: Patroni says which (see postgresWhoIsPrimary).
            "postgresNodes": [f"{h}:{POSTGRES_PORT}" for h in postgres.node_hosts],
            "redisSentinels": redis.sentinel_addresses,
            "redisMasterName": REDIS_MASTER_NAME,
            "mpiMaster": mpi.master_host,
            "backends": [m.hostname for m in backends.members],
        },
    )
    pulumi.export(
        "counts",
        {
            "backends": settings.backend.replica_count,
            "postgresReplicas": settings.postgres.replica_count,
            "redisReplicas": settings.redis.replica_count,
            "sentinels": settings.redis.sentinel_count,
            "mpiWorkers": settings.mpi.worker_count,
        },
    )
    pulumi.export("backendEnvironment", render.backend_environment(settings))
    pulumi.export(
        "postgresPrimaryDsn", _dsn(postgres.node_hosts, secrets.app_db_password, "target_session_attrs=read-write")
    )
    pulumi.export(
        "postgresStandbyDsn",
        _dsn(
            postgres.node_hosts,
            secrets.app_db_password,
            "target_session_attrs=prefer-standby&load_balance_hosts=random",
        ),
    )
    pulumi.export(
        "postgresWhoIsPrimary",
        f"docker exec {postgres.node_containers[0]} patronictl --config-file {render.PATRONI_RUN_CONF} list",
    )
    pulumi.export("postgresSuperuserPassword", secrets.postgres_password)
    pulumi.export("redisPassword", secrets.redis_password)
    pulumi.export("redisAdminPassword", secrets.redis_admin_password)
    # The API's bearer tokens by name: `pulumi stack output --show-secrets apiTokens`.
    pulumi.export("apiTokens", pulumi.Output.secret(pulumi.Output.all(**secrets.api_tokens)))
    pulumi.export("secretKey", secrets.secret_key)
