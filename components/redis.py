"""RedisSentinelGroup: Redis master and replicas, watched by Sentinels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulumi

from components import render
from components.container import (
    SERVICE_UIDS,
    ContainerSpec,
    File,
    Networks,
    VolumeMount,
    config_file,
    data_volume,
    in_turn,
    role_image,
    secret_file,
    service_container,
    shared_volume,
)
from components.settings import Settings
from components.topology import (
    REDIS_ADMIN_USER,
    REDIS_APP_USER,
    REDIS_MASTER_NAME,
    REDIS_PORT,
    REDIS_REPLICATION_USER,
    REDIS_SENTINEL_USER,
    SENTINEL_PORT,
    Node,
    Topology,
)

COMPONENT = "redis"
# The one password each kind of container holds in the clear; every other user it knows
# of, it knows only by its password's hash (in its ACL file).
NODE_PASSWORD_FILE = f"{render.SECRETS_DIR}/redis-replication-password"
SENTINEL_PASSWORD_FILE = f"{render.SECRETS_DIR}/redis-sentinel-password"
BACKUPS_DIR = "/backups"
BACKUP_MEMORY_MB = 64
BACKUP_MILLICPUS = 250


@dataclass(frozen=True)
class RedisSentinelGroupArgs:
    settings: Settings
    networks: Networks
    app_password: pulumi.Input[str]
    replication_password: pulumi.Input[str]
    sentinel_password: pulumi.Input[str]
    admin_password: pulumi.Input[str]


class RedisSentinelGroup(pulumi.ComponentResource):
    """Deploys Redis data nodes (node 0 the initial master) and S Sentinels.

    Access is by ACL user on every node and Sentinel, the default user off: the app
    (its own keys, a few commands), replication, the Sentinels, and admin for operators,
    each with its own password (render.REDIS_NODE_ACL, render.SENTINEL_ACL). Every node
    has appendonly and min-replicas-to-write; at each start a node asks the Sentinels
    who the master is and follows it. Sentinels keep their self-rewritten config on a
    volume, seeded from the rendered template only when absent. A backup job copies the
    master's data set into the backups volume on a schedule; with `redis.restoreFrom`, the
    initial master of a wiped group starts from one of those copies.
    """

    def __init__(self, name: str, args: RedisSentinelGroupArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("transvidio:redis:RedisSentinelGroup", name, None, opts)
        s = args.settings
        topo = Topology(s)
        self._name = name
        self._args = args
        self.image = role_image(f"{name}-image", COMPONENT, s, self)
        self.sentinel_addresses = render.sentinel_addresses(s)
        passwords = pulumi.Output.all(
            **{
                REDIS_APP_USER: args.app_password,
                REDIS_REPLICATION_USER: args.replication_password,
                REDIS_SENTINEL_USER: args.sentinel_password,
                REDIS_ADMIN_USER: args.admin_password,
            }
        )
        uid = SERVICE_UIDS[COMPONENT]
        node_secrets = [
            secret_file(
                render.REDIS_ACL_FILE, passwords.apply(lambda p: render.redis_acl(render.REDIS_NODE_ACL, p)), uid
            ),
            secret_file(NODE_PASSWORD_FILE, args.replication_password, uid),
        ]
        sentinel_secrets = [
            secret_file(
                render.SENTINEL_ACL_FILE, passwords.apply(lambda p: render.redis_acl(render.SENTINEL_ACL, p)), uid
            ),
            secret_file(SENTINEL_PASSWORD_FILE, args.sentinel_password, uid),
        ]
        initial_master = topo.redis_nodes[0]
        node_env = [
            f"REDIS_MASTER_NAME={REDIS_MASTER_NAME}",
            f"REDIS_SENTINELS={self.sentinel_addresses}",
            f"INITIAL_MASTER={initial_master.data_address}",
            f"DOWN_AFTER_MS={s.redis.down_after_ms}",
            f"FAILOVER_TIMEOUT_MS={s.redis.failover_timeout_ms}",
            f"REDIS_USER={REDIS_REPLICATION_USER}",
            f"REDIS_PASSWORD_FILE={NODE_PASSWORD_FILE}",
            f"DATA_SUBNET={s.network.data_subnet}",
        ]
        self.backups = shared_volume(name, "redis-backups", s, COMPONENT, self)
        restore = s.redis.restore_from
        self.master = self._node(
            initial_master,
            render.redis_conf(s, initial_master),
            [
                *node_env,
                f"REDIS_NODE={initial_master.hostname}",
                *([f"RESTORE_FROM={restore}"] if restore else []),
            ],
            node_secrets,
            wait=True,
            depends_on=[],
            # Only a restore reads the backups, and only the initial master restores.
            extra_volumes=[VolumeMount(self.backups.name, BACKUPS_DIR, read_only=True)] if restore else [],
        )
        self.replicas: list[pulumi.CustomResource] = []
        for node in topo.redis_nodes[1:]:
            self.replicas.append(
                self._node(
                    node,
                    render.redis_conf(s, node),
                    [*node_env, f"REDIS_NODE={node.hostname}"],
                    node_secrets,
                    wait=False,
                    depends_on=in_turn(s, [self.master], self.replicas[-1] if self.replicas else None),
                )
            )
        self.sentinels: list[pulumi.CustomResource] = []
        for node in topo.sentinels:
            self.sentinels.append(
                self._node(
                    node,
                    render.sentinel_conf(s, node),
                    [
                        f"REDIS_MASTER_NAME={REDIS_MASTER_NAME}",
                        f"SENTINEL_NODE={node.hostname}",
                        f"REDIS_USER={REDIS_SENTINEL_USER}",
                        f"REDIS_PASSWORD_FILE={SENTINEL_PASSWORD_FILE}",
                        f"SENTINEL_ACL_FILE={render.SENTINEL_ACL_FILE}",
                        f"DATA_SUBNET={s.network.data_subnet}",
                    ],
                    sentinel_secrets,
                    wait=False,
                    # Not after the master: a node with data waits for a Sentinel before it
                    # starts, so when every container of the group is replaced at once (a
                    # rotated password, a new image) the Sentinels must not wait for it.
                    depends_on=in_turn(s, [], self.sentinels[-1] if self.sentinels else None),
                    sentinel=True,
                )
            )
        backup_node = topo.redis_backup
        self.backup = (
            service_container(
                name,
                ContainerSpec(
                    node=backup_node,
                    component=COMPONENT,
                    image=self.image.repo_digest,
                    healthcheck=["/usr/local/bin/redis-backup.sh", "check"],
                    memory_mb=BACKUP_MEMORY_MB,
                    millicpus=BACKUP_MILLICPUS,
                    entrypoint=["/usr/local/bin/redis-backup.sh", "serve"],
                    envs=[
                        f"REDIS_MASTER_NAME={REDIS_MASTER_NAME}",
                        f"REDIS_SENTINELS={self.sentinel_addresses}",
                        f"REDIS_USER={REDIS_REPLICATION_USER}",
                        f"REDIS_PASSWORD_FILE={NODE_PASSWORD_FILE}",
                        f"BACKUP_INTERVAL_MINUTES={s.redis.backup_interval_minutes}",
                        f"BACKUP_RETENTION={s.redis.backup_retention}",
                    ],
                    volumes=[VolumeMount(self.backups.name, BACKUPS_DIR)],
                    uploads=[secret_file(NODE_PASSWORD_FILE, args.replication_password, uid)],
                    depends_on=[self.master],
                ),
                s,
                args.networks,
                self,
            )
            if backup_node
            else None
        )
        self.register_outputs(
            {
                "sentinels": self.sentinel_addresses,
                "masterName": REDIS_MASTER_NAME,
                "nodes": [n.hostname for n in topo.redis_nodes],
            }
        )

    def _node(
        self,
        node: Node,
        conf: str,
        envs: list[str],
        secrets: list[File],
        wait: bool,
        depends_on: list[pulumi.Resource],
        sentinel: bool = False,
        extra_volumes: Sequence[VolumeMount] = (),
    ) -> pulumi.CustomResource:
        s = self._args.settings
        volume = data_volume(self._name, f"{node.hostname}-data", s, COMPONENT, self)
        spec = ContainerSpec(
            node=node,
            component=COMPONENT,
            image=self.image.repo_digest,
            healthcheck=["/usr/local/bin/healthcheck.sh"],
            memory_mb=s.redis.sentinel_memory_mb if sentinel else s.redis.memory_mb,
            millicpus=s.redis.sentinel_millicpus if sentinel else s.redis.millicpus,
            container_port=SENTINEL_PORT if sentinel else REDIS_PORT,
            envs=envs,
            entrypoint=["/usr/local/bin/redis-sentinel.sh"] if sentinel else (),
            volumes=[VolumeMount(volume.name, "/data"), *extra_volumes],
            uploads=[config_file(f"{render.REDIS_CONF_DIR}/{node.hostname}.conf", conf), *secrets],
            wait=wait,
            depends_on=depends_on,
            stop_grace_seconds=30,  # an AOF rewrite or RDB save in flight finishes
        )
        return service_container(self._name, spec, s, self._args.networks, self)
