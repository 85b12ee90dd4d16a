"""The prod stack with deploy.target swarm, applied by the harness to the 3-node swarm.

The program's registrations (services, secrets, configs, overlay networks, images pushed to
the bed's registry) are applied to the first node's API, as `pulumi up` with that node as the
provider's host would; every node runs its tasks from the registry.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import docker.errors
import pytest

from components.container import LABEL_PREFIX, SERVICE_UIDS
from components.settings import parse
from components.topology import REDIS_ADMIN_USER, REDIS_MASTER_NAME, Topology
from tests.e2e import apply, report, swarm_target, traffic
from tests.e2e.swarm.conftest import Swarm
from tests.e2e.swarm.test_bed import wait_for
from tests.program import Evaluation, evaluate, plain, stack_config

STACK = "prod"
SHARED_DIR = "/tmp/transvidio-swarm/shared"
SERVICE = "docker:index/service:Service"


def swarm_overrides(swarm: Swarm) -> dict[str, Any]:
    return {
        "deploy": {
            "target": "swarm",
            "swarmNodes": sorted(swarm.nodes),
            # No IPVS in this kernel: names resolve to the tasks, nginx publishes on its node.
            "endpointMode": "dnsrr",
            "publishMode": "host",
            "sharedPath": SHARED_DIR,
        },
        "images": {"registry": swarm.registry},
    }


@dataclass
class SwarmDeployment:
    swarm: Swarm
    mocks: apply.DockerApplyMocks
    overrides: dict[str, Any]
    evaluation: Evaluation

    @property
    def topology(self) -> Topology:
        return Topology(parse(STACK, stack_config(STACK, self.overrides)))

    def services(self) -> dict[str, dict[str, Any]]:
        return {r.inputs["name"]: plain(r.inputs) for r in self.evaluation.of_type(SERVICE)}

    def export(self, name: str) -> Any:
        return plain(self.evaluation.exports[name][0])

    def api_token(self, name: str | None = None) -> str:
        return str(self.export("apiTokens")[name or self.topology.settings.backend.api_tokens[0]])

    @property
    def nginx_hosts(self) -> tuple[str, ...]:
        """Every node's address: each runs an nginx task publishing nginx.httpPort on the node."""
        return tuple(client.info()["Swarm"]["NodeAddr"] for _, client in sorted(self.swarm.nodes.items()))

    def apply(self, overrides: dict[str, Any]) -> apply.Plan:
        """`pulumi up` again with `overrides` merged into the stack's config."""
        config = {key: {**value} for key, value in self.overrides.items()}
        for key, value in overrides.items():
            config[key] = {**config.get(key, {}), **value}
        self.evaluation, plan = apply.up(self.mocks, STACK, config)
        self.overrides = config
        return plan

    def backend_image(self) -> str:
        return str(self.services()[f"{self.topology.settings.prefix}-backend"]["taskSpec"]["containerSpec"]["image"])

    def running(self, service: str, via: str | None = None) -> dict[str, dict[str, Any]]:
        """The service's running tasks, by the label of the node each runs on, as the manager
        `via` (default the first) sees them."""
        manager = self.swarm.nodes[via] if via else self.swarm.manager
        labels = {n.id: n.attrs["Spec"]["Labels"].get("transvidio.node") for n in manager.nodes.list()}
        return {
            labels[t["NodeID"]]: t for t in swarm_target.tasks(manager, service) if t["Status"]["State"] == "running"
        }

    def exec(
        self, hostname: str, command: list[str], env: dict[str, str] | None = None, via: str | None = None
    ) -> tuple[int, str]:
        """Runs `command` in the task of the node's service, on whichever node runs it."""
        ((node, task),) = self.running(f"{self.topology.settings.prefix}-{hostname}", via).items()
        container = self.swarm.nodes[node].containers.get(task["Status"]["ContainerStatus"]["ContainerID"])
        result = container.exec_run(command, environment=env or {})
        return result.exit_code, result.output.decode(errors="replace")


def shared_directories(evaluation: Evaluation) -> dict[str, int]:
    """Each directory of the shared storage the services bind, with the uid of the component that
    writes it: what an operator prepares on the shared storage (README: Deploying onto a swarm)."""
    owners: dict[str, int] = {}
    for registration in evaluation.of_type(SERVICE):
        inputs = plain(registration.inputs)
        component = {i["label"]: i["value"] for i in inputs["labels"]}[f"{LABEL_PREFIX}.component"]
        for mount in inputs["taskSpec"]["containerSpec"].get("mounts", []):
            if mount.get("type") == "bind" and not mount.get("readOnly"):
                owners[mount["source"]] = SERVICE_UIDS[component]
    return owners


def clean(swarm: Swarm) -> None:
    label = f"{LABEL_PREFIX}.stack={STACK}"
    swarm_target.teardown(swarm.manager, label)
    for client in swarm.nodes.values():  # what each node made for its tasks: containers, volumes
        for container in client.api.containers(all=True, filters={"label": label}):
            with contextlib.suppress(docker.errors.NotFound):  # its service's removal may be quicker
                client.api.remove_container(container["Id"], force=True)
        for volume in client.api.volumes(filters={"label": label}).get("Volumes") or []:
            with contextlib.suppress(docker.errors.NotFound):
                client.api.remove_volume(volume["Name"], force=True)


@pytest.fixture(scope="module")
def deployment(swarm: Swarm) -> Iterator[SwarmDeployment]:
    clean(swarm)
    shutil.rmtree(SHARED_DIR, ignore_errors=True)  # a new stack: no backups of an old one
    overrides = swarm_overrides(swarm)
    for path, uid in shared_directories(evaluate(STACK, overrides)).items():
        os.makedirs(path, exist_ok=True)
        os.chown(path, uid, uid)
    mocks = apply.DockerApplyMocks(swarm.manager, STACK)
    try:
        evaluation, plan = apply.up(mocks, STACK, overrides)
        assert plan.counts()["create"] == len(mocks.state), str(plan)
        yield SwarmDeployment(swarm, mocks, overrides, evaluation)
    finally:
        if not os.environ.get("E2E_KEEP"):
            clean(swarm)


def test_every_service_converges_on_the_node_its_placement_names(deployment: SwarmDeployment) -> None:
    services = deployment.services()
    assert len(services) == len(deployment.topology.all_nodes) - deployment.topology.settings.backend.replica_count
    for name, service in services.items():
        running = deployment.running(name)
        constraints = service["taskSpec"].get("placement", {}).get("constraints")
        if constraints:
            assert list(running) == [constraints[0].split("==")[1]], name
        elif service["taskSpec"]["placement"].get("maxReplicas") == 1:  # one on each node
            assert sorted(running) == sorted(deployment.swarm.nodes), name
        else:
            replicas = service["mode"]["replicated"]["replicas"]
            assert len(running) == replicas, name
            assert len(set(running)) == min(replicas, len(deployment.swarm.nodes)), name  # spread


def test_a_second_apply_with_no_change_does_nothing(deployment: SwarmDeployment) -> None:
    _, plan = apply.up(deployment.mocks, STACK, deployment.overrides)
    assert plan.steps == [], str(plan)


PATRONI_CLUSTER = "import urllib.request;print(urllib.request.urlopen('http://localhost:8008/cluster').read().decode())"


def test_postgres_replicas_stream_from_the_primary_across_nodes(deployment: SwarmDeployment) -> None:
    def cluster() -> dict[str, Any] | None:
        code, out = deployment.exec("postgres-replica-1", ["python3", "-c", PATRONI_CLUSTER])
        if code != 0:
            return None
        members = json.loads(out)["members"]
        streaming = [m for m in members if m["role"] != "leader" and m.get("state") == "streaming"]
        return members if len(streaming) == deployment.topology.settings.postgres.replica_count else None

    members = wait_for(cluster, 120, "every replica streaming")
    assert sorted(m["name"] for m in members) == sorted(n.hostname for n in deployment.topology.postgres_nodes)
    assert [m["name"] for m in members if m["role"] == "leader"] == ["postgres-primary"]
    assert {m["host"] for m in members} == {n.hostname for n in deployment.topology.postgres_nodes}  # names


def test_every_sentinel_names_the_same_master_by_name_and_has_its_quorum(deployment: SwarmDeployment) -> None:
    auth = {"REDISCLI_AUTH": str(deployment.export("redisAdminPassword"))}
    command = ["redis-cli", "-p", "26379", "--user", REDIS_ADMIN_USER]
    for sentinel in deployment.topology.sentinels:

        def answer(*args: str, hostname: str = sentinel.hostname) -> str | None:
            code, out = deployment.exec(hostname, [*command, *args], env=auth)
            return out.strip() if code == 0 else None

        master = wait_for(
            lambda: (
                (a := answer("SENTINEL", "get-master-addr-by-name", REDIS_MASTER_NAME)) and a.split()[0] != "" and a
            ),
            60,
            f"{sentinel.hostname} knows the master",
        )
        assert master.split() == ["redis-0", "6379"], sentinel.hostname
        assert (answer("SENTINEL", "ckquorum", REDIS_MASTER_NAME) or "").startswith("OK"), sentinel.hostname


def test_nginx_answers_on_every_node(deployment: SwarmDeployment) -> None:
    port = deployment.topology.settings.nginx.http_port
    for node, client in deployment.swarm.nodes.items():
        address = client.info()["Swarm"]["NodeAddr"]
        with urllib.request.urlopen(f"http://{address}:{port}/health", timeout=10) as response:
            assert response.status == 200, node


MISSING_JOB = "/api/jobs/00000000-0000-0000-0000-000000000000"  # a backend's own 404


def derived_backend(deployment: SwarmDeployment, tag: str, dockerfile_tail: str) -> str:
    """The stack's backend image with `dockerfile_tail` added, pushed to the bed's registry."""
    name = f"{deployment.swarm.registry}/transvidio-e2e-backend:{tag}"
    dockerfile = f"FROM {deployment.backend_image()}\n{dockerfile_tail}\n".encode()
    deployment.swarm.manager.images.build(fileobj=io.BytesIO(dockerfile), tag=name, rm=True)
    swarm_target.push(deployment.swarm.manager, name)
    return name


def test_a_new_backend_image_rolls_one_task_at_a_time_under_load_and_fails_no_request(
    deployment: SwarmDeployment,
) -> None:
    service = f"{deployment.topology.settings.prefix}-backend"
    new_image = derived_backend(deployment, "v2", "LABEL io.transvidio.e2e=v2")
    with traffic.GetStream(deployment, MISSING_JOB, expected=404, hosts=deployment.nginx_hosts) as stream:
        time.sleep(2)
        started = time.monotonic()
        plan = deployment.apply({"images": {"backend": new_image}})
        rolled = time.monotonic() - started
        time.sleep(2)
    assert [(step.op, step.name) for step in plan.steps if step.type == apply.SERVICE] == [("update", "backend")]
    images = {t["Spec"]["ContainerSpec"]["Image"] for t in swarm_target.tasks(deployment.swarm.manager, service)}
    assert images == {new_image}
    report.LINES.append(
        f"swarm: backend image rolled over {deployment.topology.settings.backend.replica_count} tasks in "
        f"{rolled:.1f}s under {stream.total} GETs: {len(stream.failures)} failed"
    )
    assert stream.total > 0
    assert stream.failures == []


def test_a_backend_image_that_never_gets_healthy_is_rolled_back_and_the_apply_fails_saying_so(
    deployment: SwarmDeployment,
) -> None:
    service = f"{deployment.topology.settings.prefix}-backend"
    before = {
        t["ID"]: t["Spec"]["ContainerSpec"]["Image"] for t in swarm_target.tasks(deployment.swarm.manager, service)
    }
    broken = derived_backend(deployment, "broken", 'ENTRYPOINT ["sleep", "infinity"]')
    with (
        traffic.GetStream(deployment, MISSING_JOB, expected=404, hosts=deployment.nginx_hosts) as stream,
        pytest.raises(Exception) as raised,
    ):
        deployment.apply({"images": {"backend": broken}})
    assert "rollback" in str(raised.value), raised.value
    assert service in str(raised.value)
    running = {t["Spec"]["ContainerSpec"]["Image"] for t in swarm_target.tasks(deployment.swarm.manager, service)}
    assert running == set(before.values())  # every task back on the image it had
    assert stream.failures == []
