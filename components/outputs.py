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


def _dsn(host: str, password: pulumi.Input[str]) -> pulumi.Output[str]:
    return pulumi.Output.secret(
        pulumi.Output.concat(
            "postgresql://", POSTGRES_APP_USER, ":", password, f"@{host}:{POSTGRES_PORT}/{POSTGRES_DB}"
        )
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
            "postgresPrimary": f"{postgres.primary_host}:{POSTGRES_PORT}",
            "postgresReplicas": [f"{h}:{POSTGRES_PORT}" for h in postgres.replica_hosts],
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
    pulumi.export("postgresPrimaryDsn", _dsn(postgres.primary_host, secrets.app_db_password))
    pulumi.export("postgresReplicaDsns", [_dsn(h, secrets.app_db_password) for h in postgres.replica_hosts])
    pulumi.export("postgresSuperuserPassword", secrets.postgres_password)
    pulumi.export("redisPassword", secrets.redis_password)
    pulumi.export("secretKey", secrets.secret_key)
