"""What runs inside the images, against the servers the images run (the dev stack's own).

The PostgreSQL healthchecks' meaning; the Redis node and Sentinel start scripts in the
cases they exist for. Each test sets up its own preconditions. (The job queue's SQL is
tested against a PostgreSQL server of its own in tests/test_queue.py.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from components import render
from tests.e2e import chaos
from tests.e2e.conftest import Deployment, deployed


@pytest.fixture(scope="module")
def dev() -> Iterator[Deployment]:
    with deployed("dev") as deployment:
        yield deployment


# --- PostgreSQL healthchecks --------------------------------------------------------------


def healthcheck(dev: Deployment, hostname: str) -> int:
    return int(dev.client.containers.get(dev.name(hostname)).exec_run(["/usr/local/bin/healthcheck.sh"]).exit_code)


def patronictl(dev: Deployment, hostname: str, *args: str) -> str:
    code, output = dev.exec(hostname, ["patronictl", "--config-file", render.PATRONI_RUN_CONF, *args])
    assert code == 0, output
    return output


def test_postgres_healthchecks_mean_what_they_say(dev: Deployment) -> None:
    primary = chaos.pg_primary(dev)
    replica = next(n.hostname for n in dev.topology.postgres_nodes if n.hostname != primary)
    chaos.wait_streaming(dev, 1)
    assert healthcheck(dev, primary) == 0 and healthcheck(dev, replica) == 0
    for member in dev.topology.etcd_nodes:
        assert healthcheck(dev, member.hostname) == 0
    # A replica that does not stream is unhealthy, though it still answers queries. Patroni's
    # maintenance mode keeps it from being promoted while its primary is stopped.
    patronictl(dev, replica, "pause", "--wait")
    stopped = dev.client.containers.get(dev.name(primary))
    stopped.stop(timeout=30)
    try:
        deadline = time.monotonic() + 60
        while healthcheck(dev, replica) == 0:
            assert time.monotonic() < deadline, "the replica stayed healthy without its primary"
            time.sleep(0.5)
        code, answer = dev.exec(replica, ["pg_isready", "-h", "/var/lib/postgresql/run"])
        assert code == 0, answer
        assert chaos.pg_local_role(dev, replica) == "replica"
    finally:
        stopped.start()
        # In maintenance mode Patroni does not start a stopped PostgreSQL: resume first.
        patronictl(dev, replica, "resume", "--wait")
    chaos.wait_streaming(dev, 1)
    deadline = time.monotonic() + 60
    while healthcheck(dev, replica) != 0:
        assert time.monotonic() < deadline, "the replica did not become healthy again"
        time.sleep(0.5)


# --- the Redis start scripts ----------------------------------------------------------------


def test_a_restarted_master_asks_the_sentinels_for_a_failover(dev: Deployment) -> None:
    master = chaos.wait_settled(dev)
    since = time.time()
    before = chaos.kill9(dev, master)
    chaos.wait_restarted(dev, master, before)
    log = chaos.logs(dev, master, since)
    assert "asking for a failover" in log and "a Sentinel started the failover" in log, log[-2000:]
    assert chaos.wait_settled(dev) != master


def test_a_node_with_data_and_no_sentinel_waits_for_one_and_loses_nothing(dev: Deployment) -> None:
    master = chaos.wait_settled(dev)
    client = chaos.redis_node(dev, master)
    client.set("kept-across-the-gap", "acknowledged")
    assert client.execute_command("WAIT", 1, 5000) == 1  # the replica has it too
    sentinel = dev.client.containers.get(dev.name(dev.topology.sentinels[0].hostname))
    sentinel.stop(timeout=10)
    try:
        since = time.time()
        chaos.kill9(dev, master)  # the master restarts with its data, nobody to ask
        chaos.wait_logged(dev, master, since, "waiting for a Sentinel before starting")
        # It serves nothing, so it cannot be a second master; the replica still follows it.
        with pytest.raises(redis.exceptions.ConnectionError):
            chaos.redis_node(dev, master).ping()
        assert list(chaos.roles(dev).values()).count("master") == 0
    finally:
        sentinel.start()
    # Back with its Sentinel, the group settles on one master with every replica
    # attached, and the acknowledged write is on it.
    settled = chaos.wait_settled(dev, timeout=120)
    assert chaos.redis_node(dev, settled).get("kept-across-the-gap") == b"acknowledged"
