"""Day 2 on a running prod stack: re-applies, in-place updates, replacements, scaling, deletes.

Every change here is made the way a user makes it: a config change and `pulumi up` again
(`Deployment.apply`), planned and applied with the provider's own rules. Tests run in file
order; each states the plan it expects and what the engine then has.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import docker.errors
import pytest

from components.container import child_name
from tests.e2e import chaos, report
from tests.e2e.apply import wait_healthy
from tests.e2e.conftest import Deployment, deployed, engine, engine_name, readback_drift
from tests.e2e.traffic import GetStream

STACK = "prod"
NO_CHANGE = {"create": 0, "update": 0, "replace": 0, "delete": 0}
MISSING_JOB = "/api/jobs/00000000-0000-0000-0000-000000000000"  # a backend's own 404


@pytest.fixture(scope="module")
def prod() -> Iterator[Deployment]:
    if readback_drift(engine()):
        pytest.skip("this engine reads containers back unlike Docker, so every apply replaces them: day-2 is Docker's")
    with deployed(STACK) as deployment:
        yield deployment


def container_ids(deployment: Deployment) -> dict[str, str]:
    containers = deployment.client.containers.list(all=True, filters={"label": f"io.transvidio.stack={STACK}"})
    return {c.name.removeprefix(f"transvidio-{STACK}-"): c.id for c in containers}


def postgres_nodes(deployment: Deployment) -> set[str]:
    return {n.hostname for n in deployment.topology.postgres_nodes}


def write_marker(deployment: Deployment) -> str:
    marker = str(uuid.uuid4())
    with chaos.pg_writer(deployment) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS e2e_lifecycle (marker text PRIMARY KEY)")
        conn.execute("INSERT INTO e2e_lifecycle VALUES (%s)", (marker,))
    return marker


def test_a_second_apply_with_no_change_plans_nothing(prod: Deployment) -> None:
    before = container_ids(prod)
    plan = prod.apply()
    report.LINES.append(f"{STACK} on {engine_name(prod.client)}: no-change re-apply plans {plan.counts()}")
    assert plan.counts() == NO_CHANGE, str(plan)
    assert container_ids(prod) == before


def test_raising_postgres_memory_is_applied_in_place(prod: Deployment) -> None:
    before = container_ids(prod)
    # 1 GB -> 3 GB: more than twice the old limit, which Docker refuses unless swap moves too.
    plan = prod.apply({"postgres": {"memory": "3GB"}})
    assert plan.counts() == {**NO_CHANGE, "update": len(postgres_nodes(prod))}, str(plan)
    assert plan.names("update") == postgres_nodes(prod)
    assert container_ids(prod) == before
    for hostname in postgres_nodes(prod):
        host = prod.client.api.inspect_container(prod.name(hostname))["HostConfig"]
        assert (host["Memory"], host["MemorySwap"]) == (3 * 1024**3, 3 * 1024**3), hostname
    assert prod.apply().counts() == NO_CHANGE


def test_a_postgres_tuning_change_replaces_only_postgres_and_keeps_the_data(prod: Deployment) -> None:
    marker = write_marker(prod)
    before = container_ids(prod)
    plan = prod.apply({"postgres": {"workMem": "64MB"}})
    assert plan.counts() == {**NO_CHANGE, "replace": len(postgres_nodes(prod))}, str(plan)
    after = container_ids(prod)
    assert {name for name in before if after.get(name) != before[name]} == postgres_nodes(prod)
    prod.wait_all_healthy()
    chaos.wait_streaming(prod, len(prod.topology.postgres_replicas))
    for hostname in postgres_nodes(prod):
        with chaos.pg(prod, hostname) as conn:
            assert conn.execute("SHOW work_mem").fetchone() == ("64MB",), hostname
            deadline = time.monotonic() + 30
            while conn.execute("SELECT 1 FROM e2e_lifecycle WHERE marker = %s", (marker,)).fetchone() is None:
                assert time.monotonic() < deadline, f"{hostname} lost {marker}"
                time.sleep(0.1)


def test_scaling_backends_up_and_down_under_load_fails_no_request(prod: Deployment) -> None:
    nginx_before = container_ids(prod)["nginx"]
    with GetStream(prod, MISSING_JOB, expected=404) as stream:
        time.sleep(2)
        up = prod.apply({"backend": {"replicas": 5}})
        assert up.counts() == {**NO_CHANGE, "create": 2} and up.names("create") == {"backend-4", "backend-5"}
        for number in (4, 5):
            wait_healthy(prod.client, prod.name(f"backend-{number}"), timeout=120)
        deadline = time.monotonic() + 60
        while not {"backend-4", "backend-5"} <= set(stream.served) and time.monotonic() < deadline:
            time.sleep(0.2)
        served_by_five = set(stream.served)
        down = prod.apply({"backend": {"replicas": 2}})
        assert down.counts() == {**NO_CHANGE, "delete": 3}
        assert down.names("delete") == {"backend-3", "backend-4", "backend-5"}
        time.sleep(3)
    report.LINES.append(
        f"{STACK}: backends 3 -> 5 -> 2 under {stream.total} GETs through nginx: {len(stream.failures)} failed"
    )
    assert stream.failures == []
    assert served_by_five == {f"backend-{i}" for i in range(1, 6)}
    remaining = container_ids(prod)
    assert {n for n in remaining if n.startswith("backend-")} == {"backend-1", "backend-2"}
    assert remaining["nginx"] == nginx_before


def test_removing_a_postgres_replica_deletes_it_drops_its_slot_and_keeps_its_volume(prod: Deployment) -> None:
    removed = prod.topology.postgres_replicas[-1]
    kept = [n for n in prod.topology.postgres_nodes if n != removed]
    plan = prod.apply({"postgres": {"replicas": 1}})
    assert plan.names("delete") == {removed.hostname}
    assert plan.names("update") == set() and plan.names("create") == set()
    with pytest.raises(docker.errors.NotFound):
        prod.client.containers.get(prod.name(removed.hostname))
    prod.client.volumes.get(f"transvidio-{STACK}-{removed.hostname}-data")  # retained on delete
    # Patroni drops the slot of a member that is gone (its key expires with the TTL), so it
    # no longer pins WAL; the primary keeps one slot per remaining replica.
    primary = chaos.pg_primary(prod)
    expected = sorted(n.slot_name for n in kept if n.hostname != primary)
    deadline = time.monotonic() + 90
    slots: list[str] = []
    while time.monotonic() < deadline:
        with chaos.pg(prod, primary) as conn:
            slots = [str(row[0]) for row in conn.execute("SELECT slot_name FROM pg_replication_slots ORDER BY 1")]
        if slots == expected:
            break
        time.sleep(1)
    assert slots == expected


def test_a_container_removed_by_hand_comes_back_only_with_refresh(prod: Deployment) -> None:
    victim = "sentinel-3"
    resource = child_name("redis", victim)  # the Pulumi resource's name, as the plan shows it
    prod.client.containers.get(prod.name(victim)).remove(force=True)
    assert prod.apply().counts() == NO_CHANGE  # `pulumi up` reads nothing live
    with pytest.raises(docker.errors.NotFound):
        prod.client.containers.get(prod.name(victim))
    plan = prod.apply(refresh=True)  # `pulumi up --refresh`
    assert plan.counts() == {**NO_CHANGE, "create": 1} and plan.names("create") == {resource}
    wait_healthy(prod.client, prod.name(victim), timeout=120)
