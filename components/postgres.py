"""PostgresReplicaSet: PostgreSQL nodes under Patroni, their etcd, and their backups."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from components import render
from components.container import (
    SERVICE_UIDS,
    ContainerSpec,
    Networks,
    VolumeMount,
    config_file,
    credentials_store,
    data_volume,
    in_turn,
    role_image,
    service_container,
    shared_volume,
)
from components.settings import Settings
from components.topology import POSTGRES_PORT, Node, Topology

COMPONENT = "postgres"
ETCD_MEMORY_MB = 128
ETCD_MILLICPUS = 1000  # a whole CPU: a starved etcd times out Patroni's requests (leader lock, initialize key)


@dataclass(frozen=True)
class PostgresReplicaSetArgs:
    settings: Settings
    networks: Networks
    superuser_password: pulumi.Input[str]
    replication_password: pulumi.Input[str]
    rewind_password: pulumi.Input[str]
    patroni_api_password: pulumi.Input[str]
    app_password: pulumi.Input[str]
    # With postgres.backupRepository s3: the key id and secret, and the CA of the endpoint (optional).
    s3_access_key_id: pulumi.Input[str] | None = None
    s3_secret_access_key: pulumi.Input[str] | None = None
    s3_ca_certificate: pulumi.Input[str] | None = None


class PostgresReplicaSet(pulumi.ComponentResource):
    """Deploys PostgreSQL nodes under Patroni, the etcd members that hold its leader lock,
    and a backup repository.

    Patroni makes one node primary and the others streaming replicas through slots it
    keeps per node (and drops for nodes the stack no longer has); when the primary is
    lost it promotes the most advanced replica (with `synchronous`, only one holding every
    acknowledged commit), and an old primary that returns is rewound and follows. Each
    node has its own retained volume; the first node bootstraps the cluster and is created
    (healthy) before the others, which clone it. Whichever node is primary archives every
    WAL segment to the shared backup repository volume and takes pgBackRest's full and
    incremental backups on the configured schedule; with `restoreTarget` set, a cluster
    bootstrapped on empty volumes restores from that repository instead of initialising.
    Every node reads every secret a primary needs (any node may become primary) from a
    credentials store, a volume it mounts read-only: a rotated password replaces only the
    store's writer, and the running nodes apply it (the primary sets the roles' new
    passwords, every node reloads Patroni), so no node restarts for a rotation.
    """

    def __init__(self, name: str, args: PostgresReplicaSetArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("transvidio:postgres:PostgresReplicaSet", name, None, opts)
        s = args.settings
        topo = Topology(s)
        self._args = args
        self.image = role_image(f"{name}-image", COMPONENT, s, self)
        uid = SERVICE_UIDS[COMPONENT]
        self.etcd: list[pulumi.CustomResource] = []
        for member in topo.etcd_nodes:
            self.etcd.append(self._etcd_member(name, member, in_turn(s, [], self.etcd[-1] if self.etcd else None)))
        # The backup repository: pgBackRest's full and incremental backups and the WAL archive.
        # The backup repository on the host, unless backups go to an S3 bucket.
        self.backups = (
            shared_volume(name, "postgres-backups", s, COMPONENT, self)
            if s.postgres.backup_repository == "volume"
            else None
        )
        secrets: dict[str, pulumi.Input[str]] = {
            "postgres-password": args.superuser_password,
            "replication-password": args.replication_password,
            "rewind-password": args.rewind_password,
            "patroni-api-password": args.patroni_api_password,
            "app-db-password": args.app_password,
        }
        if s.postgres.backup_repository == "s3":
            assert args.s3_access_key_id is not None and args.s3_secret_access_key is not None  # checked at preview
            secrets[render.PGBACKREST_S3_CREDENTIALS] = pulumi.Output.all(
                args.s3_access_key_id, args.s3_secret_access_key
            ).apply(lambda pair: render.pgbackrest_s3_credentials(*pair))
            if args.s3_ca_certificate is not None:
                secrets[render.S3_CA_FILE] = args.s3_ca_certificate
        self.credentials = credentials_store(
            name, topo.postgres_credentials, COMPONENT, self.image.repo_digest, secrets, uid, s, args.networks, self
        )
        self._uploads = [
            config_file(f"{render.POSTGRES_CONF_DIR}/postgresql.conf", render.postgresql_conf(s)),
            config_file(f"{render.POSTGRES_CONF_DIR}/pg_hba.conf", render.pg_hba_conf(s)),
            config_file(f"{render.POSTGRES_CONF_DIR}/pg_ident.conf", render.pg_ident_conf()),
            config_file(render.PGBACKREST_CONF, render.pgbackrest_conf(s)),
            config_file(f"{render.POSTGRES_CONF_DIR}/primary-setup.sql", render.primary_setup_sql()),
            config_file(render.DCS_CONF, render.patroni_dcs_json(s)),
        ]
        before_nodes: list[pulumi.Resource] = [*self.etcd, *self.credentials.before]
        self.primary = self._node(name, topo.postgres_primary, wait=True, depends_on=before_nodes)
        self.replicas: list[pulumi.CustomResource] = []
        for replica in topo.postgres_replicas:
            before_replica = [self.primary, *self.credentials.before]
            previous = self.replicas[-1] if self.replicas else None
            self.replicas.append(self._node(name, replica, wait=False, depends_on=in_turn(s, before_replica, previous)))
        self.node_hosts = [n.hostname for n in topo.postgres_nodes]
        self.node_containers = [n.container_name for n in topo.postgres_nodes]
        self.register_outputs({"nodes": self.node_hosts, "port": POSTGRES_PORT})

    def _etcd_member(self, name: str, member: Node, depends_on: list[pulumi.Resource]) -> pulumi.CustomResource:
        s = self._args.settings
        volume = data_volume(name, f"{member.hostname}-data", s, COMPONENT, self)
        return service_container(
            name,
            ContainerSpec(
                node=member,
                component=COMPONENT,
                image=self.image.repo_digest,
                # On a swarm a member's name resolves only once it is healthy: healthy there
                # means serving, before its peers (and so a leader) can be found.
                healthcheck=["/usr/local/bin/healthcheck.sh", *(["serving"] if s.deploy.swarm else [])],
                memory_mb=ETCD_MEMORY_MB,
                millicpus=ETCD_MILLICPUS,
                envs=["PG_ROLE=etcd", f"PG_NODE={member.hostname}"],
                volumes=[VolumeMount(volume.name, render.ETCD_DATA_DIR)],
                uploads=[
                    config_file(f"{render.POSTGRES_CONF_DIR}/{member.hostname}.etcd.yml", render.etcd_yml(s, member))
                ],
                # Not waited for one by one: a member is healthy only once a majority is up.
                wait=False,
                depends_on=depends_on,
            ),
            s,
            self._args.networks,
            self,
        )

    def _node(self, name: str, node: Node, wait: bool, depends_on: list[pulumi.Resource]) -> pulumi.CustomResource:
        s = self._args.settings
        pg = s.postgres
        volume = data_volume(name, f"{node.hostname}-data", s, COMPONENT, self)
        spec = ContainerSpec(
            node=node,
            component=COMPONENT,
            image=self.image.repo_digest,
            healthcheck=["/usr/local/bin/healthcheck.sh"],
            memory_mb=pg.memory_mb,
            millicpus=pg.millicpus,
            container_port=POSTGRES_PORT,
            envs=[
                "PG_ROLE=node",
                f"PG_NODE={node.hostname}",
                f"PGBACKREST_CONFIG={render.PGBACKREST_CONF}",
                f"PGBACKREST_CONFIG_INCLUDE_PATH={render.SECRETS_DIR}",
                f"PGBACKREST_STANZA={render.PGBACKREST_STANZA}",
                f"BACKUP_FULL_INTERVAL_MINUTES={pg.backup_full_interval_minutes}",
                f"BACKUP_INCREMENTAL_INTERVAL_MINUTES={pg.backup_incremental_interval_minutes}",
                f"FAILOVER_DETECT_SECONDS={pg.failover_detect_seconds}",
            ],
            volumes=[
                VolumeMount(volume.name, render.POSTGRES_DATA_DIR),
                *([VolumeMount(self.backups.name, render.PGBACKREST_REPO_DIR)] if self.backups else []),
                *self.credentials.mounts(render.SECRETS_DIR),
            ],
            uploads=[
                config_file(f"{render.POSTGRES_CONF_DIR}/{node.hostname}.patroni.yml", render.patroni_yml(s, node)),
                *self._uploads,
                *self.credentials.files(render.SECRETS_DIR),
            ],
            shm_size_mb=pg.shm_size_mb,
            egress=pg.backup_repository == "s3",  # the route out to the S3 repository
            # A replica's first clone copies the whole primary; a restore replays the archive.
            start_period_seconds=120,
            # A clean stop checkpoints and hands the leader lock over: give it time.
            stop_grace_seconds=60,
            wait=wait,
            depends_on=depends_on,
        )
        return service_container(name, spec, s, self._args.networks, self)
