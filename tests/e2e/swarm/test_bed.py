"""The swarm test bed itself, on its real nodes: what the swarm suite builds on.

Three dockerds in their own network namespaces form one swarm (tests/e2e/swarm.sh). These
check the properties the stack's swarm target relies on and that this machine could lose
without anyone noticing: every node a ready manager with its label; an image pushed to
the registry runs on every node; an overlay network spans the nodes and, with dnsrr (no
IPVS in this kernel), a service's name answers with every task from every node; a node
cut off is marked down and, when its link returns, it is back with its task.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import docker
import docker.types
import pytest

from components.settings import parse
from tests.e2e import chaos
from tests.e2e.apply import DockerApplyMocks
from tests.e2e.swarm.conftest import SWARM_SH, Swarm
from tests.program import stack_config

PROBE = "transvidio-e2e-probe"
NETWORK = "transvidio-e2e-bed"
PORT = 8000


# What a manager answers while the managers elect a raft leader (a node cut off or back can
# start an election): the call is refused, not wrong, so a wait goes on through it.
ELECTING = ("does not have a leader", "context deadline exceeded")


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    def through_elections() -> Any:
        try:
            return condition()
        except docker.errors.APIError as error:
            if any(text in str(error) for text in ELECTING):
                return None
            raise

    return chaos.wait_for(through_elections, timeout, what, interval=0.5)


@pytest.fixture(scope="module")
def probe_image(swarm: Swarm) -> str:
    """Built on the first node, pushed to the registry: the other nodes must pull it."""
    base = parse("dev", stack_config("dev")).images.base
    tag = f"{swarm.registry}/{PROBE}:latest"
    context = os.path.dirname(__file__) + "/probe"
    build = {"context": context, "dockerfile": f"{context}/Dockerfile", "args": {"BASE_IMAGE": base}}
    DockerApplyMocks(swarm.manager)._image("probe", {"imageName": tag, "build": build})
    for line in swarm.manager.images.push(tag, stream=True, decode=True):
        assert "error" not in line, line
    return tag


def running_tasks(swarm: Swarm, service: str) -> dict[str, dict[str, Any]]:
    """The service's running tasks, by the label of the node each runs on."""
    labels = {node.id: node.attrs["Spec"]["Labels"].get("transvidio.node") for node in swarm.manager.nodes.list()}
    tasks = swarm.manager.services.get(service).tasks(filters={"desired-state": "running"})
    return {labels[t["NodeID"]]: t for t in tasks if t["Status"]["State"] == "running"}


@pytest.fixture(scope="module")
def probe(swarm: Swarm, probe_image: str) -> Iterator[str]:
    """A global service (a task on every node) on an overlay network, names by dnsrr."""
    network = swarm.manager.networks.create(NETWORK, driver="overlay", attachable=True)
    service = swarm.manager.services.create(
        probe_image,
        name="bed-probe",
        networks=[NETWORK],
        mode=docker.types.ServiceMode("global"),
        endpoint_spec=docker.types.EndpointSpec(mode="dnsrr"),
    )
    try:
        wait_for(lambda: set(running_tasks(swarm, "bed-probe")) == set(swarm.nodes), 180, "a probe task on every node")
        yield "bed-probe"
    finally:
        service.remove()
        probes = {"label": "com.docker.swarm.service.name=bed-probe"}
        wait_for(
            lambda: not [c for n in swarm.nodes.values() for c in n.containers.list(all=True, filters=probes)],
            60,
            "no probe task left",
        )
        network.remove()


def task_container(swarm: Swarm, node: str, task: dict[str, Any]) -> Any:
    return swarm.nodes[node].containers.get(task["Status"]["ContainerStatus"]["ContainerID"])


def test_every_node_is_a_ready_manager_labelled_with_its_name(swarm: Swarm) -> None:
    assert swarm.node_states() == {name: ("ready", "active") for name in swarm.nodes}
    managers = [n for n in swarm.manager.nodes.list() if n.attrs.get("ManagerStatus", {}).get("Reachability")]
    assert len(managers) == len(swarm.nodes) >= 3


def test_an_image_pushed_to_the_registry_runs_on_every_node(swarm: Swarm, probe: str) -> None:
    tasks = running_tasks(swarm, probe)
    assert set(tasks) == set(swarm.nodes)
    for node, task in tasks.items():
        # Pulled from the registry by that node's own daemon: its image store has the tag.
        assert swarm.nodes[node].images.get(task["Spec"]["ContainerSpec"]["Image"].split("@")[0])


LOOKUP = """
import json, socket, sys, urllib.request
addresses = sorted({a[4][0] for a in socket.getaddrinfo(sys.argv[1], None, socket.AF_INET)})
answers = [urllib.request.urlopen(f"http://{a}:{sys.argv[2]}/", timeout=5).status for a in addresses]
print(json.dumps({"addresses": addresses, "answers": answers}))
"""


def test_a_dnsrr_name_answers_with_every_task_from_every_node(swarm: Swarm, probe: str) -> None:
    tasks = running_tasks(swarm, probe)
    expected = sorted(t["NetworksAttachments"][0]["Addresses"][0].split("/")[0] for t in tasks.values())
    assert len(expected) == len(swarm.nodes)
    for node, task in tasks.items():
        result = task_container(swarm, node, task).exec_run(["python3", "-c", LOOKUP, probe, str(PORT)])
        assert result.exit_code == 0, (node, result.output.decode(errors="replace"))
        assert json.loads(result.output) == {"addresses": expected, "answers": [200] * len(expected)}, node


def test_a_node_cut_off_is_marked_down_and_returns_with_its_task(swarm: Swarm, probe: str) -> None:
    lost = sorted(swarm.nodes)[-1]
    subprocess.run(["bash", SWARM_SH, "link", lost, "down"], check=True)
    try:
        wait_for(lambda: swarm.node_states()[lost][0] == "down", 90, f"{lost} marked down")
        wait_for(
            lambda: all(state == "ready" for node, (state, _) in swarm.node_states().items() if node != lost),
            30,
            "every other node ready",
        )
    finally:
        subprocess.run(["bash", SWARM_SH, "link", lost, "up"], check=True)
    wait_for(lambda: swarm.node_states()[lost][0] == "ready", 90, f"{lost} ready again")
    wait_for(lambda: lost in running_tasks(swarm, probe), 120, f"the probe task running on {lost} again")
