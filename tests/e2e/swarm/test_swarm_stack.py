"""The prod stack with deploy.target swarm, applied by the harness to the 3-node swarm.

The program's registrations (services, secrets, configs, overlay networks, images pushed to
the bed's registry) are applied to the first node's API, as `pulumi up` with that node as the
provider's host would; every node runs its tasks from the registry.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import docker.errors
import pytest

from components.container import LABEL_PREFIX, SERVICE_UIDS
from components.settings import parse
from components.topology import (
    POSTGRES_DB,
    REDIS_ADMIN_USER,
    REDIS_APP_USER,
    REDIS_MASTER_NAME,
    REDIS_PORT,
    SENTINEL_PORT,
    Node,
    Topology,
)
from tests.e2e import apply, report, swarm_target, traffic
from tests.e2e.swarm.conftest import SWARM_SH, Swarm
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
    converge_seconds: float = 0.0

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

    secret_config: dict[str, str] = field(default_factory=dict)  # `pulumi config set --secret` values

    def apply(self, overrides: dict[str, Any], secret_config: dict[str, str] | None = None) -> apply.Plan:
        """`pulumi up` again with `overrides` merged into the stack's config, and `secret_config`
        added to the secrets set so far."""
        config = {key: {**value} for key, value in self.overrides.items()}
        for key, value in overrides.items():
            config[key] = {**config.get(key, {}), **value}
        secrets = {**self.secret_config, **(secret_config or {})}
        self.evaluation, plan = apply.up(self.mocks, STACK, config, secret_config=secrets or None)
        self.overrides, self.secret_config = config, secrets
        return plan

    def backend_image(self) -> str:
        return str(self.services()[f"{self.topology.settings.prefix}-backend"]["taskSpec"]["containerSpec"]["image"])

    def running_tasks(self, service: str, via: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """The service's running tasks, each with the label of the node it runs on, as the
        manager `via` (default the first) sees them."""
        manager = self.swarm.nodes[via] if via else self.swarm.manager
        labels = {n.id: n.attrs["Spec"]["Labels"].get("transvidio.node") for n in manager.nodes.list()}
        return [
            (labels[t["NodeID"]], t) for t in swarm_target.tasks(manager, service) if t["Status"]["State"] == "running"
        ]

    def running(self, service: str, via: str | None = None) -> dict[str, dict[str, Any]]:
        """The service's running tasks by the node each runs on (at most one task per node)."""
        tasks = self.running_tasks(service, via)
        assert len({node for node, _ in tasks}) == len(tasks), (service, [node for node, _ in tasks])
        return dict(tasks)

    def data_address(self, hostname: str, via: str | None = None) -> str:
        """The address of the node's running task on the data network."""
        prefix = self.topology.settings.prefix
        ((_, task),) = self.running(f"{prefix}-{hostname}", via).items()
        return address_on(task, f"{prefix}-data")

    def containers_on(self, node: str, hostname: str) -> list[Any]:
        """The running containers of the node's service on `node`, as that node's own engine
        lists them (no manager asked)."""
        label = f"com.docker.swarm.service.name={self.topology.settings.prefix}-{hostname}"
        return list(self.swarm.nodes[node].containers.list(filters={"label": label}))

    def exec(
        self,
        hostname: str,
        command: list[str],
        env: dict[str, str] | None = None,
        via: str | None = None,
        on_node: str | None = None,
    ) -> tuple[int, str]:
        """Runs `command` in the task of the node's service, on whichever node runs it (as the
        manager `via` says), or with `on_node`, in its container on that node as the node's own
        engine lists it: no manager is asked, so a raft election (the leader's node lost) does
        not delay what is timed."""
        if on_node is not None:
            (container,) = self.containers_on(on_node, hostname)
        else:
            ((node, task),) = self.running(f"{self.topology.settings.prefix}-{hostname}", via).items()
            container = self.swarm.nodes[node].containers.get(task["Status"]["ContainerStatus"]["ContainerID"])
        result = container.exec_run(command, environment=env or {})
        return result.exit_code, result.output.decode(errors="replace")


def address_on(task: dict[str, Any], network: str) -> str:
    """A swarm task's address on the network named `network`."""
    (attachment,) = [a for a in task["NetworksAttachments"] if a["Network"]["Spec"]["Name"] == network]
    return str(attachment["Addresses"][0].split("/")[0])


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
    # A node back from a cut can start an election: wait for a leader first.
    wait_for(lambda: swarm.manager.nodes.list(), 120, "a swarm leader")
    swarm_target.teardown(swarm.manager, label)
    for client in swarm.nodes.values():  # what each node made for its tasks: containers, volumes
        for container in client.api.containers(all=True, filters={"label": label}):
            # Its service's removal may be quicker, or under way ("already in progress").
            apply.remove_container(functools.partial(client.api.remove_container, container["Id"], force=True))
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
        started = time.monotonic()
        evaluation, plan = apply.up(mocks, STACK, overrides)
        assert plan.counts()["create"] == len(mocks.state), str(plan)
        yield SwarmDeployment(swarm, mocks, overrides, evaluation, converge_seconds=time.monotonic() - started)
    finally:
        if not os.environ.get("E2E_KEEP"):
            clean(swarm)


def misplaced(deployment: SwarmDeployment, via: str | None = None, spread: bool = True) -> list[str]:
    """Every service whose running tasks are not where its placement puts them, as the manager
    `via` sees it: a pinned one on its node, one per node on every node, a replicated one with
    its replicas (spread over the nodes, unless `spread` is False: Swarm does not move tasks
    back to a node that returns). Empty when the stack has converged as declared."""
    problems = []
    for name, service in deployment.services().items():
        nodes = sorted(node for node, _ in deployment.running_tasks(name, via))
        constraints = service["taskSpec"].get("placement", {}).get("constraints")
        if constraints:
            wanted: Any = [constraints[0].split("==")[1]]
            placed: Any = nodes
        elif service["taskSpec"]["placement"].get("maxReplicas") == 1:  # one on each node
            wanted, placed = sorted(deployment.swarm.nodes), nodes
        else:
            replicas = service["mode"]["replicated"]["replicas"]
            wanted = (replicas, min(replicas, len(deployment.swarm.nodes)) if spread else None)
            placed = (len(nodes), len(set(nodes)) if spread else None)
        if placed != wanted:
            problems.append(f"{name}: {placed}, not {wanted}")
    return problems


def test_every_service_converges_on_the_node_its_placement_names(deployment: SwarmDeployment) -> None:
    services = deployment.services()
    assert len(services) == len(deployment.topology.all_nodes) - deployment.topology.settings.backend.replica_count
    assert misplaced(deployment) == []
    report.LINES.append(
        f"swarm: the prod stack converged on {len(deployment.swarm.nodes)} nodes "
        f"{deployment.converge_seconds:.0f}s after the apply started"
    )


def test_a_second_apply_with_no_change_does_nothing(deployment: SwarmDeployment) -> None:
    _, plan = apply.up(deployment.mocks, STACK, deployment.overrides)
    assert plan.steps == [], str(plan)


PATRONI_CLUSTER = "import urllib.request;print(urllib.request.urlopen('http://localhost:8008/cluster').read().decode())"


def cluster_streaming(deployment: SwarmDeployment, member: str, via: str | None = None) -> list[dict[str, Any]] | None:
    """Patroni's members as `member` sees them, once every replica streams (None before)."""
    try:
        code, out = deployment.exec(member, ["python3", "-c", PATRONI_CLUSTER], via=via)
    except (ValueError, docker.errors.APIError):  # its task is not running, or its node does not answer
        return None
    if code != 0:
        return None
    members: list[dict[str, Any]] = json.loads(out)["members"]
    streaming = [m for m in members if m["role"] != "leader" and m.get("state") == "streaming"]
    return members if len(streaming) == deployment.topology.settings.postgres.replica_count else None


def test_postgres_replicas_stream_from_the_primary_across_nodes(deployment: SwarmDeployment) -> None:
    members = wait_for(lambda: cluster_streaming(deployment, "postgres-replica-1"), 120, "every replica streaming")
    assert sorted(m["name"] for m in members) == sorted(n.hostname for n in deployment.topology.postgres_nodes)
    assert [m["name"] for m in members if m["role"] == "leader"] == ["postgres-primary"]
    assert {m["host"] for m in members} == {n.hostname for n in deployment.topology.postgres_nodes}  # names


def test_every_sentinel_names_the_same_master_by_its_address_and_has_its_quorum(deployment: SwarmDeployment) -> None:
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
        # An address, never a name: a Sentinel resolving a name that is gone stalls and tilts.
        assert master.split() == [deployment.data_address("redis-0"), "6379"], sentinel.hostname
        assert (answer("SENTINEL", "ckquorum", REDIS_MASTER_NAME) or "").startswith("OK"), sentinel.hostname


def test_nginx_answers_on_every_node(deployment: SwarmDeployment) -> None:
    port = deployment.topology.settings.nginx.http_port
    for node, client in deployment.swarm.nodes.items():
        address = client.info()["Swarm"]["NodeAddr"]
        with urllib.request.urlopen(f"http://{address}:{port}/health", timeout=10) as response:
            assert response.status == 200, node


def test_an_upload_and_a_long_job_through_nginx_run_ranks_on_every_node(deployment: SwarmDeployment) -> None:
    first, last = deployment.nginx_hosts[0], deployment.nginx_hosts[-1]
    data = os.urandom(256 * 1024)
    upload_id = traffic.upload(deployment, data, host=last)
    job = traffic.submit(deployment, upload_id, 90, "fr", host=last)
    assert job["runner"] == "mpi"
    done = traffic.wait_done(deployment, job["id"], host=first)  # any node's nginx knows every job
    assert (done["status"], done["completions"]) == ("succeeded", 1), done
    result = traffic.fetch_result(deployment, done, host=first)  # the outputs are on the shared storage
    traffic.check_result(result, data, done)
    node_of = {node.hostname: node.swarm_node for node in deployment.topology.mpi_nodes}
    assert {node_of[segment["host"]] for segment in result["segments"]} == set(deployment.swarm.nodes)
    assert result["ranks"] == len(node_of) * deployment.topology.settings.mpi.slots_per_node


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


ADMIN_CLI = ["redis-cli", "--user", REDIS_ADMIN_USER, "--no-auth-warning"]


def sentinel_master(
    deployment: SwarmDeployment, sentinel: str, via: str | None = None, on_node: str | None = None
) -> str | None:
    """The master's address as the Sentinel `sentinel` names it now (None if it does not answer)."""
    env = {"REDISCLI_AUTH": str(deployment.export("redisAdminPassword"))}
    command = [*ADMIN_CLI, "-p", "26379", "SENTINEL", "get-master-addr-by-name", REDIS_MASTER_NAME]
    try:
        code, out = deployment.exec(sentinel, command, env=env, via=via, on_node=on_node)
    except (ValueError, docker.errors.APIError):  # its task is not running, or its node does not answer
        return None
    return out.split()[0] if code == 0 and out.strip() else None


def update_windows(deployment: SwarmDeployment, hostnames: list[str]) -> list[tuple[str, str, str]]:
    """(started, completed, hostname) of each node's service's last update, in start order."""
    windows = []
    for hostname in hostnames:
        status = deployment.swarm.manager.api.inspect_service(f"{deployment.topology.settings.prefix}-{hostname}")
        update = status.get("UpdateStatus") or {}
        windows.append((update.get("StartedAt", ""), update.get("CompletedAt", ""), hostname))
    return sorted(windows)


def as_app(deployment: SwarmDeployment, hostname: str, port: int, password: str, *command: str) -> str:
    """What the node answers the app's user with `password`."""
    cli = ["redis-cli", "-p", str(port), "--user", REDIS_APP_USER, "--no-auth-warning"]
    _, out = deployment.exec(hostname, [*cli, *command], env={"REDISCLI_AUTH": password})
    return out.strip()


def secrets_of(deployment: SwarmDeployment) -> dict[str, Any]:
    """Each service's swarm secrets, as the program declares them now."""
    return {name: spec["taskSpec"]["containerSpec"].get("secrets") for name, spec in deployment.services().items()}


def test_a_rotated_redis_password_rolls_to_every_service_that_uses_it_a_node_at_a_time(
    deployment: SwarmDeployment,
) -> None:
    topology = deployment.topology
    prefix = topology.settings.prefix
    before = secrets_of(deployment)
    old = str(deployment.export("redisPassword"))
    rotated = f"rotated-{uuid.uuid4().hex}"
    with traffic.GetStream(deployment, MISSING_JOB, expected=404, hosts=deployment.nginx_hosts) as stream:
        stream.wait_answers(20)
        started = time.monotonic()
        plan = deployment.apply({}, secret_config={"redisPassword": rotated})
        rolled = time.monotonic() - started
        stream.wait_answers(20)
    # Exactly the services that hold the password (or the ACL made from it) got a new secret,
    # each by an update in place: a rolling update.
    using = {n.container_name for n in [*topology.redis_nodes, *topology.sentinels]} | {f"{prefix}-backend"}
    after = secrets_of(deployment)
    assert {name for name in after if after[name] != before[name]} == using
    assert sorted(step.op for step in plan.steps if step.type == apply.SERVICE) == ["update"] * len(using)
    # Each tier's nodes one after another: no update began before the one before it completed.
    for tier in (topology.redis_nodes, topology.sentinels):
        windows = update_windows(deployment, [n.hostname for n in tier])
        for (_, completed, first), (begun, _, second) in itertools.pairwise(windows):
            assert completed and begun >= completed, (first, second, windows)
    # The new password opens the app's keys on the master and discovery on every Sentinel; the old one nothing.
    master = sentinel_master(deployment, topology.sentinels[0].hostname)
    (master_host,) = [n.hostname for n in topology.redis_nodes if deployment.data_address(n.hostname) == master]
    assert as_app(deployment, master_host, REDIS_PORT, rotated, "PING") == "PONG"
    assert "WRONGPASS" in as_app(deployment, master_host, REDIS_PORT, old, "PING")
    for sentinel in topology.sentinels:
        ask = ("SENTINEL", "get-master-addr-by-name", REDIS_MASTER_NAME)
        assert as_app(deployment, sentinel.hostname, SENTINEL_PORT, rotated, *ask).split()[0] == master
        assert "WRONGPASS" in as_app(deployment, sentinel.hostname, SENTINEL_PORT, old, *ask)
    report.LINES.append(
        f"swarm: the Redis password rotated by config rolled to {len(using)} services in {rolled:.0f}s "
        f"under {stream.total} GETs: {len(stream.failures)} failed"
    )
    assert stream.failures == []


def patroni_leader(deployment: SwarmDeployment, member: str, on_node: str | None) -> str | None:
    """The Patroni leader's name as the member `member` (its container on `on_node`) sees the
    cluster (None if it does not answer)."""
    try:
        code, out = deployment.exec(member, ["python3", "-c", PATRONI_CLUSTER], on_node=on_node)
    except (ValueError, docker.errors.APIError):
        return None
    leaders = [m["name"] for m in json.loads(out)["members"] if m["role"] == "leader"] if code == 0 else []
    return str(leaders[0]) if leaders else None


def swarm_node_of(topology: Topology, hostname: str) -> str | None:
    return next(node.swarm_node for node in topology.all_nodes if node.hostname == hostname)


def redis_settled(deployment: SwarmDeployment, sentinel: str, via: str | None = None) -> bool:
    """Whether the Sentinel `sentinel` has no failover in progress and sees every other data node
    streaming from the master: that many replicas up (flags just `slave`) with their link ok. A
    task restarted at a new address leaves its old one listed, down."""
    env = {"REDISCLI_AUTH": str(deployment.export("redisAdminPassword"))}
    # Redis 8 answers the master as a map. A failover still reconfiguring the replicas cannot
    # end while its promoted replica is down (Sentinel's sentinelFailoverDetectEnd), nor can a
    # new one start: a node lost then leaves the group without a master until it returns.
    command = [*ADMIN_CLI, "--json", "-p", str(SENTINEL_PORT), "SENTINEL", "master", REDIS_MASTER_NAME]
    code, out = deployment.exec(sentinel, command, env=env, via=via)
    if code != 0 or json.loads(out).get("flags") != "master":
        return False
    command = [*ADMIN_CLI, "--json", "-p", str(SENTINEL_PORT), "SENTINEL", "replicas", REDIS_MASTER_NAME]
    code, out = deployment.exec(sentinel, command, env=env, via=via)
    if code != 0:
        return False
    replicas: list[dict[str, str]] = json.loads(out)  # Redis 8 answers each replica as a map
    up = [r for r in replicas if r["flags"] == "slave" and r["master-link-status"] == "ok"]
    return len(up) == deployment.topology.settings.redis.replica_count


def said_on(deployment: SwarmDeployment, node: Node, command: list[str], env: dict[str, str] | None = None) -> str:
    """What `command` prints in `node`'s container on its swarm node, or why it could not run:
    a line of a report read after a failure."""
    assert node.swarm_node is not None
    try:
        return deployment.exec(node.hostname, command, env=env, on_node=node.swarm_node)[1]
    except (ValueError, docker.errors.APIError) as error:
        return f"no answer: {error}"


def sentinels_seen(deployment: SwarmDeployment, lost: str) -> str:
    """What the Sentinels that remain say of the master and each other, and their last log lines:
    what a failover that did not happen leaves to read."""
    env = {"REDISCLI_AUTH": str(deployment.export("redisAdminPassword"))}
    report_lines = []
    for sentinel in deployment.topology.sentinels:
        if sentinel.swarm_node == lost:
            continue
        for ask in (["SENTINEL", "master", REDIS_MASTER_NAME], ["SENTINEL", "sentinels", REDIS_MASTER_NAME]):
            out = said_on(deployment, sentinel, [*ADMIN_CLI, "-p", str(SENTINEL_PORT), *ask], env)
            report_lines.append(f"--- {sentinel.hostname} {' '.join(ask)}:\n{out}")
        assert sentinel.swarm_node is not None
        for container in deployment.containers_on(sentinel.swarm_node, sentinel.hostname):
            report_lines.append(f"--- {sentinel.hostname} log:\n{container.logs(tail=40).decode(errors='replace')}")
    return "\n".join(report_lines)


def accepted(
    deployment: SwarmDeployment, upload_id: str, duration: int, host: str, unanswered: list[str]
) -> dict[str, Any] | None:
    """The job if the API accepts it now; None while it answers 503 (a dependency down), or 504.

    A 504 is a submission whose backend did not answer within nginx's 10 s: its fate is unknown
    to the client (a resubmission may make a second job). Seen in CI after a node loss,
    cause not yet found: each is kept in `unanswered` with every nginx's and backend's last log
    lines, and reported."""
    document = {"upload_id": upload_id, "duration_seconds": duration, "target_language": "it"}
    status, job = traffic.api(deployment, "POST", "/api/jobs", document, host=host)
    if status == 504:
        unanswered.append(edge_logs(deployment))
        return None
    assert status in (201, 503), (status, job)
    return dict(job) if status == 201 else None


def edge_logs(deployment: SwarmDeployment) -> str:
    """The last log lines of every nginx and backend container each node runs, but for the
    access lines of the GETs the test streams: what a request that got no answer or a job that
    did not finish leaves to read (which backend nginx chose, what that backend and its job
    worker did)."""
    report_lines = []
    for node in sorted(deployment.swarm.nodes):
        for hostname in ("nginx", "backend"):
            try:
                containers = deployment.containers_on(node, hostname)
            except docker.errors.APIError as error:
                report_lines.append(f"--- {hostname} on {node}: no answer: {error}")
                continue
            for container in containers:
                lines = container.logs(tail=1000, timestamps=True).decode(errors="replace").splitlines()
                tail = "\n".join([line for line in lines if '"GET /' not in line][-40:])
                report_lines.append(f"--- {hostname} on {node} ({container.name}):\n{tail}")
    return "\n".join(report_lines)


def postgres_seen(deployment: SwarmDeployment, lost: str, job_id: str) -> str:
    """What each PostgreSQL node that remains says of the job and of itself, as its superuser:
    its role and synchronous standby, the job's row, its replication, and every session not
    idle with what it waits on (a commit waiting for a gone synchronous standby holds its
    row locked from every other claimer): what a job that never finished leaves to read."""
    queries = (
        "SELECT pg_is_in_recovery() AS replica, current_setting('synchronous_standby_names') AS sync_names",
        f"SELECT status, claimed_by, attempts, lease_until, now() FROM jobs WHERE id = '{uuid.UUID(job_id)}'",
        "SELECT application_name, state, sync_state, replay_lsn, replay_lag FROM pg_stat_replication",
        "SELECT pid, usename, state, wait_event_type, wait_event, now() - query_start AS running, "
        "left(query, 100) AS query FROM pg_stat_activity WHERE state <> 'idle' AND pid <> pg_backend_pid()",
    )
    command = ["psql", "--host=/var/lib/postgresql/run", f"--dbname={POSTGRES_DB}", "-X"]
    for query in queries:
        command += ["-c", query]
    report_lines = []
    for node in deployment.topology.postgres_nodes:
        if node.swarm_node == lost:
            continue
        report_lines.append(f"--- {node.hostname} on {node.swarm_node}:\n{said_on(deployment, node, command)}")
    return "\n".join(report_lines)


def upstreams_on(deployment: SwarmDeployment, node: str) -> list[str] | None:
    """The backend addresses the nginx task on `node` balances over now (None if it does not answer)."""
    try:
        containers = deployment.containers_on(node, "nginx")
    except docker.errors.APIError:
        return None
    # Only stderr, all of it: the entrypoint's lines go there, and under load the access log
    # (stdout) would push them out of any tail.
    logs = "".join(c.logs(stdout=False, stderr=True).decode(errors="replace") for c in containers)
    return traffic.applied_upstreams(logs)


def test_a_lost_node_under_load_fails_over_keeps_answering_runs_jobs_and_returns(deployment: SwarmDeployment) -> None:
    topology = deployment.topology
    # From a settled group: a failover of the test before (a rolled Redis node asks for one)
    # still reconfiguring replicas when the node goes would be a second fault, not this one.
    wait_for(
        lambda: all(redis_settled(deployment, s.hostname) for s in topology.sentinels),
        120,
        "every Sentinel with no failover in progress and every Redis replica streaming, before the cut",
    )
    # The node to lose: the one the Redis master runs on now (node n1 at first, with the
    # PostgreSQL primary, an etcd member, a Sentinel, the MPI master, a backend and an nginx).
    master = sentinel_master(deployment, topology.sentinels[0].hostname)
    (master_host,) = [n.hostname for n in topology.redis_nodes if deployment.data_address(n.hostname) == master]
    (lost,) = deployment.running(f"{topology.settings.prefix}-{master_host}")
    survivors = sorted(node for node in deployment.swarm.nodes if node != lost)
    via = survivors[0]  # a manager the cut leaves with the others
    nodes = sorted(deployment.swarm.nodes)
    hosts = tuple(address for node, address in zip(nodes, deployment.nginx_hosts, strict=True) if node != lost)
    sentinel_node, surviving_sentinel = next(
        (s.swarm_node, s.hostname) for s in topology.sentinels if s.swarm_node != lost
    )
    member_node, surviving_member = next(
        (n.swarm_node, n.hostname) for n in topology.postgres_nodes if n.swarm_node != lost
    )
    # Backend tasks are not rebalanced after a rolled-back update: the lost node may run none, or two.
    backends = deployment.running_tasks(f"{topology.settings.prefix}-backend")
    edge = f"{topology.settings.prefix}-edge"
    lost_backends = {address_on(task, edge) for node, task in backends if node == lost}
    data = os.urandom(64 * 1024)
    upload_id = traffic.upload(deployment, data, host=hosts[0])
    known = traffic.submit(deployment, upload_id, 5, "it", host=hosts[0])
    # Clients reading a job (a replica answers: reads need no primary) that wait 30 s for an
    # answer: one in flight on the lost node's backend when the link goes is retried by nginx
    # on another after its API read timeout (10 s).
    path = f"/api/jobs/{known['id']}"
    with traffic.GetStream(deployment, path, expected=200, hosts=hosts, timeout=30) as stream:
        stream.wait_answers(20)
        cut = time.monotonic()
        subprocess.run(["bash", SWARM_SH, "link", lost, "down"], check=True)
        try:
            # A Sentinel whose attempt was aborted (not elected: two voters left can split)
            # tries again only after twice the failover timeout: the wait allows one retry.
            redis = topology.settings.redis
            retry_seconds = (redis.down_after_ms + 2 * redis.failover_timeout_ms) / 1000 + 30
            try:
                promoted = wait_for(
                    lambda: (
                        (m := sentinel_master(deployment, surviving_sentinel, on_node=sentinel_node))
                        not in (None, master)
                        and m
                    ),
                    retry_seconds,
                    "a Redis replica promoted by the Sentinels that remain",
                )
            except AssertionError as error:
                raise AssertionError(f"{error}\n{sentinels_seen(deployment, lost)}") from None
            redis_seconds = time.monotonic() - cut
            # The lost node's backends still resolve (Swarm's DNS keeps a task on a node it
            # cannot reach) but no longer answer: every nginx that remains drops them, or a POST
            # sent there is a 504 (nginx retries no POST elsewhere).
            wait_for(
                lambda: all(
                    (servers := upstreams_on(deployment, node)) is not None and not lost_backends & set(servers)
                    for node in survivors
                ),
                30,
                f"the lost node's backends {sorted(lost_backends)} out of every remaining nginx",
            )
            unbalanced_seconds = time.monotonic() - cut
            leader = wait_for(
                lambda: (
                    (name := patroni_leader(deployment, surviving_member, member_node))
                    and swarm_node_of(topology, name) != lost
                    and name
                ),
                120,
                "a PostgreSQL leader on a node that remains",
            )
            postgres_seconds = time.monotonic() - cut
            # Writes come back once the backends reach the new leader (until then a submission
            # is a 503 naming PostgreSQL, which a client retries). Jobs go on: a short one runs
            # in a backend now; a long one runs on the MPI nodes that answer (or, with the MPI
            # master on the lost node, once it is back).
            unanswered: list[str] = []
            short_job = wait_for(
                lambda: accepted(deployment, upload_id, 20, hosts[0], unanswered), 120, "a job accepted"
            )
            writes_seconds = time.monotonic() - cut
            try:
                short = traffic.wait_done(deployment, short_job["id"], host=hosts[0])
            except AssertionError as error:  # seen once in CI (2026-12-06), cause not yet found
                seen = f"{postgres_seen(deployment, lost, short_job['id'])}\n{edge_logs(deployment)}"
                raise AssertionError(f"{error}\n{seen}") from None
            assert short["status"] == "succeeded", short
            long = traffic.submit(deployment, upload_id, 90, "it", host=hosts[0])
            stream.wait_answers(200)
        finally:
            subprocess.run(["bash", SWARM_SH, "link", lost, "up"], check=True)
        back = time.monotonic()
        wait_for(lambda: deployment.swarm.node_states_via(via)[lost][0] == "ready", 120, f"{lost} ready again")
        # Every service back where its placement puts it, the lost node's included (a backend
        # task that moved away stays where it went: Swarm does not rebalance).
        wait_for(lambda: not misplaced(deployment, via, spread=False), 300, "every service placed as declared again")
        returned = time.monotonic() - back
        stream.wait_answers(50)
    done = traffic.wait_done(deployment, long["id"], timeout=300, host=hosts[0])
    assert (done["status"], done["completions"]) == ("succeeded", 1), done
    traffic.check_result(traffic.fetch_result(deployment, done, host=hosts[0]), data, done)
    # The data tiers whole again: every Redis replica streaming from the one master, every
    # PostgreSQL replica streaming from the leader.
    wait_for(lambda: redis_settled(deployment, surviving_sentinel, via), 120, "every Redis replica streaming")
    wait_for(lambda: cluster_streaming(deployment, surviving_member, via), 120, "every PostgreSQL replica streaming")
    failures = stream.failure_times
    disruption = (max(failures) - min(failures)) if failures else 0.0
    report.LINES.append(
        f"swarm: {lost} lost under {stream.total} GETs through the other nodes' nginx: {len(failures)} failed "
        f"({disruption:.1f}s from the first to the last), the slowest answered in {stream.slowest:.1f}s; "
        f"Redis master {master_host} -> {promoted} in "
        f"{redis_seconds:.1f}s, its backends out of every nginx within {unbalanced_seconds:.1f}s, "
        f"PostgreSQL leader {leader} within {postgres_seconds:.1f}s, a job accepted after "
        f"{writes_seconds:.1f}s ({len(unanswered)} submissions before it answered 504); every service back "
        f"{returned:.0f}s after the link"
    )
    report.LINES.extend(
        f"swarm: a submission answered 504; what nginx and the backends logged:\n{logs}" for logs in unanswered
    )
    # Each failure with its time after the cut: which phase of the failover it fell in.
    timed = [(f"{at - cut:.1f}s", what) for at, what in zip(failures, stream.failures, strict=True)]
    assert stream.failures == [], f"{timed}\n{edge_logs(deployment) if timed else ''}"
