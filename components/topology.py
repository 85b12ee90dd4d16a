"""The cluster's nodes: names, addresses and published ports, derived from settings.

Pure and deterministic; the components, the renderers and the tests all read the
same plan, so a hostfile, an nginx upstream and a container's address never disagree.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from components.settings import ADDRESS_BLOCKS, Settings, spread_index

POSTGRES_PORT = 5432
REDIS_PORT = 6379
SENTINEL_PORT = 26379
BACKEND_PORT = 8000
NGINX_HTTP_PORT = 8080  # inside the container: nginx runs unprivileged
NGINX_HTTPS_PORT = 8443
SSH_PORT = 22
REDIS_MASTER_NAME = "transvidio"
# Redis ACL users: the application, replication between data nodes, the Sentinels.
REDIS_APP_USER = "app"
REDIS_REPLICATION_USER = "replica"
REDIS_SENTINEL_USER = "sentinel"
REDIS_ADMIN_USER = "admin"
POSTGRES_DB = "transvidio"
POSTGRES_APP_USER = "transvidio"
POSTGRES_REPLICATION_USER = "replicator"
POSTGRES_REWIND_USER = "rewinder"
PATRONI_PORT = 8008
PATRONI_API_USER = "patroni"
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380


@dataclass(frozen=True)
class Node:
    """One container of the cluster."""

    # postgres-primary, postgres-replica, etcd, redis, sentinel, mpi-master, mpi-worker, backend, nginx.
    # A PostgreSQL node's role is the one it starts with: after a failover any node may be primary.
    role: str
    hostname: str  # DNS name inside the stack's networks
    container_name: str  # Docker name, prefixed with the stack
    data_ip: str | None  # its fixed address on the data network (None on a swarm: tasks get theirs)
    edge_ip: str | None
    host_port: int | None
    on_data: bool
    on_edge: bool
    swarm_node: str | None  # on a swarm: the transvidio.node label of the node it is pinned to

    @property
    def data_address(self) -> str:
        """How the others reach it on the data network: its fixed address, or on a swarm its name."""
        return self.data_ip or self.hostname

    @property
    def slot_name(self) -> str:
        """The replication slot Patroni keeps for a PostgreSQL node (its member name, made a slot name)."""
        return self.hostname.replace("-", "_")


def _address(subnet: ipaddress.IPv4Network, block: str, index: int) -> str:
    return str(subnet.network_address + ADDRESS_BLOCKS[block][0] + index)


def _port(first: int | None, index: int) -> int | None:
    return None if first is None else first + index


@dataclass(frozen=True)
class Topology:
    settings: Settings

    def _node(
        self, role: str, hostname: str, block: str, index: int, edge: bool, data: bool = True, port: int | None = None
    ) -> Node:
        net = self.settings.network
        deploy = self.settings.deploy
        # On a swarm no task has a fixed address; the members of one role go round-robin over
        # the nodes (a role's `index` counts from 0 within its block).
        fixed = not deploy.swarm
        swarm_node = deploy.swarm_nodes[spread_index(index, len(deploy.swarm_nodes))] if deploy.swarm else None
        return Node(
            role=role,
            hostname=hostname,
            container_name=f"{self.settings.prefix}-{hostname}",
            data_ip=_address(net.data_subnet, block, index) if data and fixed else None,
            edge_ip=_address(net.edge_subnet, block, index) if edge and fixed else None,
            host_port=port,
            on_data=data,
            on_edge=edge,
            swarm_node=swarm_node,
        )

    @property
    def postgres_primary(self) -> Node:
        return self._node(
            "postgres-primary", "postgres-primary", "postgres", 0, False, port=self.settings.postgres.publish_port
        )

    def _postgres_replica(self, index: int) -> Node:
        port = _port(self.settings.postgres.publish_port, index)
        return self._node("postgres-replica", f"postgres-replica-{index}", "postgres", index, False, port=port)

    @property
    def postgres_replicas(self) -> list[Node]:
        return [self._postgres_replica(i) for i in range(1, self.settings.postgres.replica_count + 1)]

    @property
    def postgres_nodes(self) -> list[Node]:
        """Every PostgreSQL node; the first bootstraps the cluster (Patroni member names)."""
        return [self.postgres_primary, *self.postgres_replicas]

    @property
    def postgres_credentials(self) -> Node:
        """Writes the PostgreSQL tier's secrets into the volume the nodes read them from: a
        rotated password reaches the running nodes without replacing them. No network."""
        return self._node("postgres-credentials", "postgres-credentials", "postgres", 0, False, data=False)

    @property
    def etcd_nodes(self) -> list[Node]:
        """The consensus store that holds Patroni's leader lock."""
        return [
            self._node("etcd", f"etcd-{i + 1}", "etcd", i, False) for i in range(self.settings.postgres.consensus_nodes)
        ]

    @property
    def redis_nodes(self) -> list[Node]:
        """Node 0 is the initial master; after a failover any node may be."""
        first = self.settings.redis.publish_port
        return [
            self._node("redis", f"redis-{i}", "redis", i, False, port=_port(first, i))
            for i in range(self.settings.redis.replica_count + 1)
        ]

    @property
    def redis_backup(self) -> Node | None:
        """Copies the master's data set to the backups on a schedule (none when it is 0)."""
        if not self.settings.redis.backup_interval_minutes:
            return None
        return self._node("redis-backup", "redis-backup", "redis-backup", 0, False)

    @property
    def sentinels(self) -> list[Node]:
        first = self.settings.redis.sentinel_publish_port
        return [
            self._node("sentinel", f"sentinel-{i + 1}", "sentinel", i, False, port=_port(first, i))
            for i in range(self.settings.redis.sentinel_count)
        ]

    @property
    def mpi_master(self) -> Node:
        return self._node("mpi-master", "mpi-master", "mpi", 0, False)

    @property
    def mpi_workers(self) -> list[Node]:
        return [
            self._node("mpi-worker", f"mpi-worker-{i}", "mpi", i, False)
            for i in range(1, self.settings.mpi.worker_count + 1)
        ]

    @property
    def mpi_nodes(self) -> list[Node]:
        return [self.mpi_master, *self.mpi_workers]

    @property
    def backends(self) -> list[Node]:
        return [
            self._node("backend", f"backend-{i + 1}", "backend", i, True)
            for i in range(self.settings.backend.replica_count)
        ]

    @property
    def all_nodes(self) -> list[Node]:
        """Every container of the stack."""
        return [
            *self.postgres_nodes,
            self.postgres_credentials,
            *self.etcd_nodes,
            *self.redis_nodes,
            *([self.redis_backup] if self.redis_backup else []),
            *self.sentinels,
            *self.mpi_nodes,
            *self.backends,
            self.nginx,
        ]

    @property
    def nginx(self) -> Node:
        return self._node("nginx", "nginx", "nginx", 0, True, data=False, port=self.settings.nginx.http_port)
