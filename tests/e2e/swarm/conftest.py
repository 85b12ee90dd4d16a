"""The swarm suite's engine: the nodes `tests/e2e/swarm.sh up` started (`make e2e-swarm`).

SWARM_HOSTS names each node's API ("n1=unix://... n2=unix://..."); SWARM_REGISTRY is the
registry every node pulls from. Outside CI the suite skips when they are not set; in CI it
must run.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import docker
import pytest

SWARM_SH = os.path.join(os.path.dirname(__file__), "..", "swarm.sh")


@dataclass
class Swarm:
    nodes: dict[str, docker.DockerClient]  # by node name (its transvidio.node label)
    registry: str

    @property
    def manager(self) -> docker.DockerClient:
        return self.nodes[sorted(self.nodes)[0]]

    def node_states(self) -> dict[str, tuple[str, str]]:
        """Each node's (state, availability) as the managers see it, by its label."""
        return self.node_states_via(sorted(self.nodes)[0])

    def node_states_via(self, manager: str) -> dict[str, tuple[str, str]]:
        """Each node's (state, availability) as the manager `manager` sees it (one that is not
        cut off), by its label."""
        return {
            node.attrs["Spec"]["Labels"].get("transvidio.node", node.id): (
                node.attrs["Status"]["State"],
                node.attrs["Spec"]["Availability"],
            )
            for node in self.nodes[manager].nodes.list()
        }

    def restart_missing_nodes(self) -> None:
        """`swarm.sh up` again: it starts only what is not running."""
        subprocess.run(["bash", SWARM_SH, "up"], check=True)


@pytest.fixture(scope="session")
def swarm() -> Iterator[Swarm]:
    hosts = os.environ.get("SWARM_HOSTS", "")
    registry = os.environ.get("SWARM_REGISTRY", "")
    if not hosts or not registry:
        if os.environ.get("CI"):
            pytest.fail("SWARM_HOSTS and SWARM_REGISTRY are not set: run the suite with `make e2e-swarm`")
        pytest.skip("no swarm: run `make e2e-swarm` (as root: ip netns, Debian's docker.io and docker-registry)")
    nodes = {}
    for item in hosts.split():
        name, url = item.split("=", 1)
        nodes[name] = docker.DockerClient(base_url=url, timeout=300)
    yield Swarm(nodes=nodes, registry=registry)
    for client in nodes.values():
        client.close()
