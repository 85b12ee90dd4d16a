"""The dev stack, up for real: replication, Sentinel, MPI over SSH, nginx."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from transvidio_jobs import processing

from components.secrets import GENERATED
from components.topology import REDIS_MASTER_NAME
from tests.e2e import report, traffic
from tests.e2e.chaos import logs, wait_streaming
from tests.e2e.conftest import Deployment, deployed, engine_name, readback_drift
from tests.program import plain


@pytest.fixture(scope="module")
def dev() -> Iterator[Deployment]:
    with deployed("dev") as deployment:
        yield deployment


def dsn_on_host(deployment: Deployment, port: int) -> str:
    """The app DSN from the stack's (secret) output, pointed at a published debug port."""
    dsn = str(deployment.export("postgresPrimaryDsn"))
    credentials = dsn.split("@", 1)[0]
    return f"{credentials}@127.0.0.1:{port}/transvidio?connect_timeout=5"


def http_get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_every_container_is_healthy(dev: Deployment) -> None:
    dev.assert_all_healthy()


def test_postgres_replica_streams_from_the_primary(dev: Deployment) -> None:
    marker = str(uuid.uuid4())
    with psycopg.connect(dsn_on_host(dev, 5432), autocommit=True) as primary:
        primary.execute("CREATE TABLE IF NOT EXISTS e2e_replication (marker text PRIMARY KEY)")
        primary.execute("INSERT INTO e2e_replication VALUES (%s)", (marker,))
        rows = primary.execute(
            "SELECT application_name, state FROM pg_stat_replication ORDER BY application_name"
        ).fetchall()
        slots = primary.execute("SELECT slot_name, active FROM pg_replication_slots").fetchall()
    assert rows == [("postgres-replica-1", "streaming")]  # Patroni's member name
    assert slots == [("postgres_replica_1", True)]
    deadline = time.monotonic() + 30
    with psycopg.connect(dsn_on_host(dev, 5433), autocommit=True) as replica:
        assert replica.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        found = None
        while found is None and time.monotonic() < deadline:
            # Asynchronous: even the table may not have arrived yet.
            with contextlib.suppress(psycopg.errors.UndefinedTable):
                found = replica.execute("SELECT 1 FROM e2e_replication WHERE marker = %s", (marker,)).fetchone()
            if found is None:
                time.sleep(0.1)
        assert found == (1,)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            replica.execute("INSERT INTO e2e_replication VALUES ('nope')")


def test_postgres_rejects_a_wrong_password(dev: Deployment) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect("postgresql://transvidio:wrong@127.0.0.1:5432/transvidio?connect_timeout=5")


def test_redis_replica_is_connected_and_sentinel_has_quorum(dev: Deployment) -> None:
    password = str(dev.export("redisAdminPassword"))
    master = redis.Redis(host="127.0.0.1", port=6379, username="admin", password=password, socket_timeout=5)
    # The replica's first full sync may still be running (wait_bgsave, send_bulk): wait for it.
    deadline = time.monotonic() + 30
    while True:
        info: dict[str, Any] = master.info("replication")  # type: ignore[assignment]
        assert info["role"] == "master"
        if info.get("slave0", {}).get("state") == "online" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert info["connected_slaves"] == 1
    assert info["slave0"]["state"] == "online"
    sentinel = redis.Redis(host="127.0.0.1", port=26379, username="admin", password=password, socket_timeout=5)
    assert sentinel.execute_command("SENTINEL", "CKQUORUM", REDIS_MASTER_NAME).decode().startswith("OK")
    initial_master = dev.topology.redis_nodes[0]
    assert sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", REDIS_MASTER_NAME) == [
        str(initial_master.data_ip).encode(),
        b"6379",
    ]


def test_redis_refuses_clients_without_a_user_and_its_password(dev: Deployment) -> None:
    for port in (6379, 26379):  # a data node, a Sentinel: the default user is off on both
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=5).ping()
        wrong = str(dev.export("redisAdminPassword"))  # the app user's name with another's password
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, username="app", password=wrong, socket_timeout=5).ping()


def test_mpirun_spans_master_and_worker_over_ssh(dev: Deployment) -> None:
    exit_code, output = dev.exec(
        "mpi-master",
        [
            "mpirun",
            "--hostfile",
            "/etc/transvidio/mpi/hostfile",
            "-np",
            "2",
            "python3",
            "/usr/local/lib/transvidio/cluster_check.py",
        ],
        user="app",
    )
    assert exit_code == 0, output
    result = json.loads(processing.last_output_line(output))
    assert result == {"size": 2, "hosts": ["mpi-master", "mpi-worker-1"]}
    # The host key is pinned: ssh refuses a host whose key is not in known_hosts.
    exit_code, output = dev.exec(
        "mpi-master",
        [
            "ssh",
            "-o",
            "BatchMode=yes",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "mpi-worker-1",
            "true",
        ],
        user="app",
    )
    assert exit_code != 0 and "Host key verification failed" in output


def test_nginx_serves_liveness_to_all_and_readiness_to_the_cluster_only(dev: Deployment) -> None:
    status, body = http_get("http://127.0.0.1:8080/health")
    assert status == 200
    status, _ = http_get("http://127.0.0.1:8080/api/health")  # the host: outside the cluster
    assert status == 403
    status, body = traffic.from_inside(dev, "/api/health")
    assert status == 200, body
    report = json.loads(body)
    assert report["status"] == "ok"
    assert set(report["dependencies"]) == {
        "postgres-primary",
        "postgres:postgres-primary",
        "postgres:postgres-replica-1",
        "redis",
        "mpi-master",
    }
    assert all(dep["ok"] for dep in report["dependencies"].values())
    # It names the node that is primary now, and each node's role.
    assert report["dependencies"]["postgres-primary"]["node"] == "postgres-primary"
    assert report["dependencies"]["postgres:postgres-replica-1"]["role"] == "replica"


def test_nginx_starts_with_every_backend_that_answered_before_it(dev: Deployment) -> None:
    # nginx is created after the backends are healthy: its first upstream list has them all,
    # not an empty one that the next check a second later fills in.
    backends = [dev.client.containers.get(dev.name(b.hostname)) for b in dev.topology.backends]
    addresses = sorted(c.attrs["NetworkSettings"]["Networks"]["transvidio-dev-edge"]["IPAddress"] for c in backends)
    assert addresses
    nginx_logs = logs(dev, "nginx")
    assert sorted(traffic.upstream_lists(nginx_logs)[0]) == addresses, nginx_logs


def test_nginx_status_is_for_the_cluster_only(dev: Deployment) -> None:
    status, _ = http_get("http://127.0.0.1:8080/nginx-status")
    assert status == 403
    status, body = traffic.from_inside(dev, "/nginx-status")
    assert status == 200 and b"Active connections" in body


def test_every_response_carries_the_security_headers(dev: Deployment) -> None:
    for path in ("/health", "/api/jobs/not-a-job", "/outputs/missing"):
        _, headers, _ = traffic.request(dev, "GET", path)
        assert headers.get("x-content-type-options") == "nosniff", path
        assert headers.get("x-frame-options") == "DENY", path
        assert headers.get("referrer-policy") == "no-referrer", path
        assert "server" not in headers or "nginx/" not in headers["server"], path


def test_a_large_json_body_is_refused_and_the_backend_stays_healthy(dev: Deployment) -> None:
    body = b'{"pad": "' + b"x" * (20 * 1024 * 1024) + b'"}'
    status, _, _ = traffic.request(dev, "POST", "/api/jobs", body, {"Content-Type": "application/json"})
    assert status == 413
    status, _, raw = traffic.request(dev, "POST", "/api/uploads", b"still here")
    assert status == 201, raw
    dev.assert_all_healthy()


def balanced(dev: Deployment) -> list[str]:
    """The backend addresses nginx balances over now."""
    return traffic.applied_upstreams(logs(dev, "nginx")) or []


def scale_to_two_backends_in_nginx(dev: Deployment) -> None:
    dev.apply({"backend": {"replicas": 2}})
    dev.wait_all_healthy()
    deadline = time.monotonic() + 30
    while len(balanced(dev)) < 2:
        assert time.monotonic() < deadline, "nginx never took the second backend"
        time.sleep(1)


def test_a_degraded_dependency_never_takes_the_backends_out_of_nginx(dev: Deployment) -> None:
    # The app answers 503 while a replica is down; nginx must not count that against the
    # backends, or a few readiness calls would make every /api/ request a 502. nginx never
    # rests the only server of an upstream: this needs two backends.
    scale_to_two_backends_in_nginx(dev)
    replica = dev.client.containers.get(dev.name("postgres-replica-1"))
    replica.stop(timeout=30)
    try:
        deadline = time.monotonic() + 60
        while traffic.from_inside(dev, "/api/health")[0] != 503:
            assert time.monotonic() < deadline, "readiness never reported the stopped replica"
            time.sleep(1)
        assert [traffic.from_inside(dev, "/api/health")[0] for _ in range(20)] == [503] * 20
        status, _, raw = traffic.request(dev, "POST", "/api/uploads", b"during a degraded dependency")
        assert status == 201, raw
    finally:
        replica.start()
        wait_streaming(dev, 1)
        dev.apply({"backend": {"replicas": 1}})


def test_a_backend_that_stops_answering_leaves_nginx_and_posts_go_to_the_others(dev: Deployment) -> None:
    # A paused backend still resolves and still takes connections (its kernel does), the way
    # a backend on a node cut off still resolves: nginx would send it a POST and, as POSTs are
    # not retried elsewhere, answer 504 after its read timeout. The entrypoint's probes take
    # it out instead, and put it back once it answers.
    scale_to_two_backends_in_nginx(dev)
    backend = dev.client.containers.get(dev.name("backend-2"))
    address = backend.attrs["NetworkSettings"]["Networks"]["transvidio-dev-edge"]["IPAddress"]
    assert address in balanced(dev)
    backend.pause()
    try:
        deadline = time.monotonic() + 30
        while address in balanced(dev):
            assert time.monotonic() < deadline, "nginx kept the backend that stopped answering"
            time.sleep(0.5)
        statuses = [traffic.request(dev, "POST", "/api/uploads", b"to the one that answers")[0] for _ in range(10)]
        assert statuses == [201] * 10
    finally:
        backend.unpause()
    deadline = time.monotonic() + 30
    while address not in balanced(dev):
        assert time.monotonic() < deadline, "nginx never took back the backend that answers again"
        time.sleep(0.5)
    dev.apply({"backend": {"replicas": 1}})


def test_a_second_apply_with_no_change_plans_nothing(dev: Deployment) -> None:
    before = {c.name: c.id for c in dev.client.containers.list(all=True, filters={"label": "io.transvidio.stack=dev"})}
    plan = dev.apply()
    report.LINES.append(f"dev on {engine_name(dev.client)}: no-change re-apply plans {plan.counts()}")
    dev.assert_plans_nothing(plan)
    after = {c.name: c.id for c in dev.client.containers.list(all=True, filters={"label": "io.transvidio.stack=dev"})}
    if not readback_drift(dev.client):
        assert after == before


def test_the_shared_volumes_belong_to_the_writers_whoever_mounted_them_first(dev: Deployment) -> None:
    for path in ("/srv/transvidio/uploads", "/srv/transvidio/outputs"):
        for hostname in ("backend-1", "mpi-master"):
            code, owner = dev.exec(hostname, ["stat", "-c", "%u %a", path])
            assert (code, owner.strip()) == (0, "10010 755"), (hostname, path)
    # nginx mounts outputs read-only and without copy-up: it reads what the writers own.
    code, owner = dev.exec("nginx", ["stat", "-c", "%u", "/srv/transvidio/outputs"])
    assert (code, owner.strip()) == (0, "10010")


def test_a_new_subnet_replaces_the_network_and_the_containers_on_it(dev: Deployment) -> None:
    on_edge = {"backend-1", "nginx"}
    before = {c.name: c.id for c in dev.client.containers.list(all=True, filters={"label": "io.transvidio.stack=dev"})}
    old_network = dev.client.networks.get("transvidio-dev-edge").id
    plan = dev.apply({"network": {"edgeSubnet": "10.210.2.0/24"}})
    # Delete-before-replace: the containers on the network go first, then the network; both come back.
    assert plan.names("replace", "docker:index/network:Network") == {"network-edge"}
    after = {c.name: c.id for c in dev.client.containers.list(all=True, filters={"label": "io.transvidio.stack=dev"})}
    replaced = {n.removeprefix("transvidio-dev-") for n in before if after.get(n) != before[n]}
    if not readback_drift(dev.client):  # elsewhere the drift replaces the rest too
        assert plan.names("replace") == on_edge
        assert plan.counts() == {"create": 0, "update": 0, "replace": 3, "delete": 0}, str(plan)
        assert replaced == on_edge
    assert on_edge <= replaced and on_edge <= plan.names("replace")
    network = dev.client.networks.get("transvidio-dev-edge")
    assert network.id != old_network
    assert network.attrs["IPAM"]["Config"][0]["Subnet"] == "10.210.2.0/24"
    dev.wait_all_healthy()
    status, body = traffic.from_inside(dev, "/api/health")
    assert status == 200, body


def test_no_secret_is_in_any_container_environment(dev: Deployment) -> None:
    # What `docker inspect` shows (and every child process inherits): names and paths only.
    secrets = [
        str(plain(r.outputs["result"])) for r in dev.evaluation.of_type("random:index/randomPassword:RandomPassword")
    ]
    assert len(secrets) == len(GENERATED) + len(dev.topology.settings.backend.api_tokens)
    containers = dev.client.containers.list(all=True, filters={"label": "io.transvidio.stack=dev"})
    assert len(containers) == len(dev.container_names)
    for container in containers:
        environment = "\n".join(container.attrs["Config"]["Env"] or [])
        assert not [s for s in secrets if s in environment], container.name
    # The backend reads them from its files: it is serving, with the application role's password.
    status, _, raw = traffic.request(dev, "POST", "/api/uploads", b"secret-free")
    assert status == 201, raw
