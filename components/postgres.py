"""PostgresReplicaSet: a PostgreSQL primary and its streaming replicas."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_docker as docker

from components import render
from components.container import (
    SERVICE_UIDS,
    ContainerSpec,
    Networks,
    VolumeMount,
    config_file,
    data_volume,
    role_image,
    secret_file,
    service_container,
)
from components.settings import Settings
from components.topology import POSTGRES_PORT, POSTGRES_REPLICATION_USER, Node, Topology

COMPONENT = "postgres"
SLOT_KEEPER_MEMORY_MB = 64


@dataclass(frozen=True)
class PostgresReplicaSetArgs:
    settings: Settings
    networks: Networks
    superuser_password: pulumi.Input[str]
    replication_password: pulumi.Input[str]
    app_password: pulumi.Input[str]


class PostgresReplicaSet(pulumi.ComponentResource):
    """Deploys a primary, N streaming replicas, a slot keeper and a backup repository.

    Each node has its own retained volume and /dev/shm size. The primary is created
    with `wait=True` and the replicas depend on it; each replica bootstraps with
    pg_basebackup through its own replication slot (only when its volume is empty) and
    is healthy only while in recovery and streaming. The slot keeper drops the slots of
    replicas the stack no longer has, so scaling down frees the WAL they pinned; the
    primary's config does not depend on the replica count, so scaling never restarts it.
    The primary archives every WAL segment to the backup repository volume and takes
    pgBackRest's full and incremental backups on the configured schedule; started empty
    with `restoreTarget` set, it restores from that repository instead of initialising.
    """

    def __init__(self, name: str, args: PostgresReplicaSetArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("transvidio:postgres:PostgresReplicaSet", name, None, opts)
        s = args.settings
        topo = Topology(s)
        self._args = args
        self.image = role_image(f"{name}-image", COMPONENT, s, self)
        uid = SERVICE_UIDS[COMPONENT]
        replication_secret = secret_file(f"{render.SECRETS_DIR}/replication-password", args.replication_password, uid)
        self._common_uploads = [
            config_file(f"{render.POSTGRES_CONF_DIR}/pg_hba.conf", render.pg_hba_conf(s)),
            replication_secret,
        ]
        # The backup repository: pgBackRest's full and incremental backups and the WAL archive.
        self.backups = data_volume(name, "postgres-backups", s, COMPONENT, self)
        pg = s.postgres
        self.primary = self._node(
            name,
            topo.postgres_primary,
            envs=[
                "PG_ROLE=primary",
                f"PG_NODE={topo.postgres_primary.hostname}",
                f"PGBACKREST_CONFIG={render.PGBACKREST_CONF}",
                f"PGBACKREST_STANZA={render.PGBACKREST_STANZA}",
                f"BACKUP_FULL_INTERVAL_MINUTES={pg.backup_full_interval_minutes}",
                f"BACKUP_INCREMENTAL_INTERVAL_MINUTES={pg.backup_incremental_interval_minutes}",
                f"RESTORE_TARGET={pg.restore_target}",
            ],
            extra_volumes=[VolumeMount(self.backups.name, render.PGBACKREST_REPO_DIR)],
            uploads=[
                config_file(render.PGBACKREST_CONF, render.pgbackrest_conf(s)),
                config_file(f"{render.POSTGRES_CONF_DIR}/primary-setup.sql", render.primary_setup_sql()),
                secret_file(f"{render.SECRETS_DIR}/postgres-password", args.superuser_password, uid),
                secret_file(f"{render.SECRETS_DIR}/app-db-password", args.app_password, uid),
            ],
            wait=True,
            depends_on=[],
        )
        self.replicas = [
            self._node(
                name,
                replica,
                envs=[
                    "PG_ROLE=replica",
                    f"PG_NODE={replica.hostname}",
                    f"PG_SLOT={replica.slot_name}",
                    f"PRIMARY_HOST={topo.postgres_primary.hostname}",
                    f"REPLICATION_USER={POSTGRES_REPLICATION_USER}",
                ],
                uploads=[],
                wait=False,
                depends_on=[self.primary],
                extra_hosts=[topo.postgres_primary],
            )
            for replica in topo.postgres_replicas
        ]
        keeper = topo.postgres_slot_keeper
        self.slot_keeper = service_container(
            name,
            ContainerSpec(
                node=keeper,
                component=COMPONENT,
                image=self.image.repo_digest,
                healthcheck=["/usr/local/bin/healthcheck.sh"],
                memory_mb=SLOT_KEEPER_MEMORY_MB,
                envs=[
                    "PG_ROLE=slots",
                    f"PG_NODE={keeper.hostname}",
                    f"PG_STALE_SLOTS={','.join(topo.stale_replica_slots())}",
                    f"PRIMARY_HOST={topo.postgres_primary.hostname}",
                    f"REPLICATION_USER={POSTGRES_REPLICATION_USER}",
                ],
                uploads=[replication_secret],
                depends_on=[self.primary],
                extra_hosts=[topo.postgres_primary],
            ),
            s,
            args.networks,
            self,
        )
        self.primary_host = topo.postgres_primary.hostname
        self.replica_hosts = [r.hostname for r in topo.postgres_replicas]
        self.register_outputs({"primary": self.primary_host, "replicas": self.replica_hosts, "port": POSTGRES_PORT})

    def _node(
        self,
        name: str,
        node: Node,
        envs: list[str],
        uploads: list[docker.ContainerUploadArgs],
        wait: bool,
        depends_on: list[pulumi.Resource],
        extra_hosts: list[Node] | None = None,
        extra_volumes: list[VolumeMount] | None = None,
    ) -> docker.Container:
        s = self._args.settings
        volume = data_volume(name, f"{node.hostname}-data", s, COMPONENT, self)
        spec = ContainerSpec(
            node=node,
            component=COMPONENT,
            image=self.image.repo_digest,
            healthcheck=["/usr/local/bin/healthcheck.sh"],
            memory_mb=s.postgres.memory_mb,
            container_port=POSTGRES_PORT,
            envs=envs,
            volumes=[VolumeMount(volume.name, render.POSTGRES_DATA_DIR), *(extra_volumes or [])],
            uploads=[
                config_file(f"{render.POSTGRES_CONF_DIR}/{node.hostname}.conf", render.postgresql_conf(s, node)),
                *self._common_uploads,
                *uploads,
            ],
            shm_size_mb=s.postgres.shm_size_mb,
            # A replica's first base backup copies the whole primary: give it time.
            start_period_seconds=120 if node.role == "postgres-replica" else 60,
            # A fast shutdown checkpoints first: give it time rather than a crash recovery.
            stop_grace_seconds=60,
            wait=wait,
            depends_on=depends_on,
            extra_hosts=extra_hosts or [],
        )
        return service_container(name, spec, s, self._args.networks, self)
