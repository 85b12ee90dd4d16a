"""ClusterNetworks: the edge network, the internal data network, and the egress network."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_docker as docker

from components.container import Networks, stack_labels
from components.settings import Settings


@dataclass(frozen=True)
class ClusterNetworksArgs:
    settings: Settings


class ClusterNetworks(pulumi.ComponentResource):
    """Deploys the bridge networks with the stack's subnets (on a swarm, overlay networks).

    edge: nginx and the backends. data: PostgreSQL, Redis, Sentinel, MPI and the
    backends; `internal` (no route out, nothing published) unless the stack opts out
    for debug ports. egress, only with an S3 backup repository: the PostgreSQL nodes'
    route out to it, and nobody else's.
    """

    def __init__(self, name: str, args: ClusterNetworksArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("transvidio:network:ClusterNetworks", name, None, opts)
        s = args.settings
        self.edge = self._network(f"{name}-edge", f"{s.prefix}-edge", s, str(s.network.edge_subnet), internal=False)
        self.data = self._network(
            f"{name}-data", f"{s.prefix}-data", s, str(s.network.data_subnet), internal=s.network.data_internal
        )
        self.egress = (
            self._network(f"{name}-egress", f"{s.prefix}-egress", s, str(s.network.egress_subnet), internal=False)
            if s.postgres.backup_repository == "s3"
            else None
        )

        # How the target names a network: containers by name, services by id (the provider
        # reads a service's networks back as ids: a name would show a change on every run).
        def ref(network: docker.Network) -> pulumi.Output[str]:
            return network.id if s.deploy.swarm else network.name

        self.names = Networks(
            edge=ref(self.edge), data=ref(self.data), egress=ref(self.egress) if self.egress else None
        )
        self.register_outputs({"edge": self.edge.name, "data": self.data.name})

    def _network(
        self, resource_name: str, docker_name: str, s: Settings, subnet: str, internal: bool
    ) -> docker.Network:
        # On a swarm, overlays spanning the nodes (IPsec between them with deploy.encryptOverlay).
        swarm = s.deploy.swarm
        return docker.Network(
            resource_name,
            name=docker_name,
            driver="overlay" if swarm else "bridge",
            options={"encrypted": "true"} if swarm and s.deploy.encrypt_overlay else None,
            internal=internal,
            ipam_configs=[docker.NetworkIpamConfigArgs(subnet=subnet)],
            labels=[docker.NetworkLabelArgs(label=k, value=v) for k, v in stack_labels(s).items()],
            # Fixed names: the old network must go (with the containers on it) before the new one.
            opts=pulumi.ResourceOptions(parent=self, delete_before_replace=True),
        )
