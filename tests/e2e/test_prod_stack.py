"""The prod stack, up for real: healthy on this machine, and only nginx is reachable."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from tests.e2e import traffic
from tests.e2e.conftest import Deployment, deployed

DATA_TIER = {"postgres-primary": 5432, "postgres-replica-1": 5432, "redis-0": 6379, "sentinel-1": 26379}


@pytest.fixture(scope="module")
def prod() -> Iterator[Deployment]:
    with deployed("prod") as deployment:
        yield deployment


def tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def probe_from(deployment: Deployment, hostname: str, address: str, port: int) -> bool:
    """Whether `hostname`'s container can open a TCP connection to address:port."""
    code, _ = deployment.exec(hostname, ["timeout", "3", "bash", "-c", f"</dev/tcp/{address}/{port}"])
    return code == 0


def test_every_container_is_healthy(prod: Deployment) -> None:
    prod.assert_all_healthy()


def test_from_the_host_only_nginx_answers(prod: Deployment) -> None:
    published = {
        c.name: {port: bound for port, bound in (c.attrs["HostConfig"].get("PortBindings") or {}).items() if bound}
        for c in prod.client.containers.list(filters={"label": "io.transvidio.stack=prod"})
    }
    assert {name for name, bindings in published.items() if bindings} == {"transvidio-prod-nginx"}
    assert [b["HostPort"] for b in published["transvidio-prod-nginx"]["8080/tcp"]] == ["80"]
    status, body = traffic.from_inside(prod, "/api/health")  # readiness is for the cluster only
    assert status == 200, body
    report = json.loads(body)
    assert report["status"] == "ok"
    # The primary through the host list, each of the 3 PostgreSQL nodes, Redis, MPI.
    assert len(report["dependencies"]) == 1 + 3 + 1 + 1
    for port in (5432, 5433, 6379, 26379, 8000, 22):
        assert not tcp_open("127.0.0.1", port), port


def test_from_the_edge_network_the_data_tier_is_unreachable(prod: Deployment) -> None:
    addresses = {
        name: next(
            n["IPAddress"]
            for net, n in prod.client.containers.get(prod.name(name)).attrs["NetworkSettings"]["Networks"].items()
            if net.endswith("-data")
        )
        for name in DATA_TIER
    }
    for name, port in DATA_TIER.items():
        # A backend sits on both networks and reaches it (the control)...
        assert probe_from(prod, "backend-1", addresses[name], port), name
        # ...nginx sits on the edge network only and does not.
        assert not probe_from(prod, "nginx", addresses[name], port), name
    code, _ = prod.exec("nginx", ["getent", "hosts", "postgres-primary"])
    assert code != 0


def test_data_network_is_internal(prod: Deployment) -> None:
    network = prod.client.networks.get("transvidio-prod-data")
    assert network.attrs["Internal"] is True
    # No route out of the data network: a replica cannot reach the edge network's nginx.
    nginx_ip = prod.client.containers.get(prod.name("nginx")).attrs["NetworkSettings"]["Networks"][
        "transvidio-prod-edge"
    ]["IPAddress"]
    assert not probe_from(prod, "redis-0", nginx_ip, 8080)
