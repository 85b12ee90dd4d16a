"""RedisSentinelGroup: Redis master and replicas, watched by Sentinels."""

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
from components.topology import REDIS_MASTER_NAME, REDIS_PORT, SENTINEL_PORT, Node, Topology

COMPONENT = "redis"


@dataclass(frozen=True)
class RedisSentinelGroupArgs:
    settings: Settings
    networks: Networks
    password: pulumi.Input[str]


class RedisSentinelGroup(pulumi.ComponentResource):
    """Deploys Redis data nodes (node 0 the initial master) and S Sentinels.

    Every node has requirepass and masterauth (roles swap after a failover),
    appendonly and min-replicas-to-write; at each start a node asks the Sentinels who
    the master is and follows it. Sentinels keep their self-rewritten config on a
    volume, seeded from the rendered template only when absent.
    """

    def __init__(self, name: str, args: RedisSentinelGroupArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("transvidio:redis:RedisSentinelGroup", name, None, opts)
        s = args.settings
        topo = Topology(s)
        self._name = name
        self._args = args
        self.image = role_image(f"{name}-image", COMPONENT, s, self)
        self.sentinel_addresses = render.sentinel_addresses(s)
        initial_master = topo.redis_nodes[0]
        common_env = [
            f"REDIS_MASTER_NAME={REDIS_MASTER_NAME}",
            f"REDIS_SENTINELS={self.sentinel_addresses}",
            f"INITIAL_MASTER={initial_master.data_ip}",
            f"DOWN_AFTER_MS={s.redis.down_after_ms}",
            f"FAILOVER_TIMEOUT_MS={s.redis.failover_timeout_ms}",
        ]
        self.master = self._node(
            initial_master,
            render.redis_conf(s, initial_master),
            [*common_env, f"REDIS_NODE={initial_master.hostname}", f"REDIS_ANNOUNCE_IP={initial_master.data_ip}"],
            REDIS_PORT,
            s.redis.memory_mb,
            wait=True,
            depends_on=[],
        )
        self.replicas = [
            self._node(
                node,
                render.redis_conf(s, node),
                [*common_env, f"REDIS_NODE={node.hostname}", f"REDIS_ANNOUNCE_IP={node.data_ip}"],
                REDIS_PORT,
                s.redis.memory_mb,
                wait=False,
                depends_on=[self.master],
            )
            for node in topo.redis_nodes[1:]
        ]
        self.sentinels = [
            self._node(
                node,
                render.sentinel_conf(s, node),
                [f"REDIS_MASTER_NAME={REDIS_MASTER_NAME}", f"SENTINEL_NODE={node.hostname}"],
                SENTINEL_PORT,
                s.redis.sentinel_memory_mb,
                wait=False,
                depends_on=[self.master],
                entrypoint="/usr/local/bin/redis-sentinel.sh",
            )
            for node in topo.sentinels
        ]
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
        port: int,
        memory_mb: int,
        wait: bool,
        depends_on: list[pulumi.Resource],
        entrypoint: str | None = None,
    ) -> docker.Container:
        s = self._args.settings
        volume = data_volume(self._name, f"{node.hostname}-data", s, COMPONENT, self)
        spec = ContainerSpec(
            node=node,
            component=COMPONENT,
            image=self.image.repo_digest,
            healthcheck=["/usr/local/bin/healthcheck.sh"],
            memory_mb=memory_mb,
            container_port=port,
            envs=envs,
            entrypoint=[entrypoint] if entrypoint else (),
            volumes=[VolumeMount(volume.name, "/data")],
            uploads=[
                config_file(f"{render.REDIS_CONF_DIR}/{node.hostname}.conf", conf),
                secret_file(f"{render.SECRETS_DIR}/redis-password", self._args.password, SERVICE_UIDS[COMPONENT]),
            ],
            wait=wait,
            depends_on=depends_on,
            stop_grace_seconds=30,  # an AOF rewrite or RDB save in flight finishes
        )
        return service_container(self._name, spec, s, self._args.networks, self)
