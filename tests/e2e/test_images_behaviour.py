"""What runs inside the images, against the servers the images run (the dev stack's own).

The job queue (images/common/transvidio_jobs) against the stack's PostgreSQL, in a schema
of its own; the PostgreSQL healthchecks' meaning; the Redis node and Sentinel start
scripts in the cases they exist for. Each test sets up its own preconditions.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from transvidio_jobs import queue, worker

from components import render
from tests.e2e import chaos
from tests.e2e.conftest import Deployment, deployed

SCHEMA = "e2e_queue"


@pytest.fixture(scope="module")
def dev() -> Iterator[Deployment]:
    with deployed("dev") as deployment:
        yield deployment


def connect(dev: Deployment) -> psycopg.Connection[Any]:
    """The application role's connection to the primary, in the tests' own schema."""
    return chaos.pg_writer(dev, options=f"-c search_path={SCHEMA}")


@pytest.fixture
def conn(dev: Deployment) -> Iterator[psycopg.Connection[Any]]:
    with chaos.pg_writer(dev) as admin:
        admin.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        admin.execute(f"CREATE SCHEMA {SCHEMA}")
    with connect(dev) as connection:
        queue.ensure_schema(connection)
        yield connection


def add_jobs(conn: psycopg.Connection[Any], count: int, runner: str = "mpi") -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(count)]
    for job_id in ids:
        conn.execute(
            "INSERT INTO jobs (id, upload_id, duration_seconds, target_language, runner) "
            "VALUES (%s, 'u', 90, 'fr', %s)",
            (job_id, runner),
        )
    return ids


def job(conn: psycopg.Connection[Any], job_id: str) -> dict[str, Any]:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        row = cur.execute(f"SELECT {queue.COLUMNS}, lease_until FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return dict(row)


def claim_until(conn: psycopg.Connection[Any], worker_name: str, lease: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (claimed := queue.claim(conn, "mpi", worker_name, lease)) is None:
        assert time.monotonic() < deadline, f"nothing claimable by {worker_name} within {timeout}s"
        time.sleep(0.1)
    return claimed


# --- the job queue ---------------------------------------------------------------------


def test_competing_claimers_each_get_different_jobs_and_every_job_once(dev: Deployment, conn: Any) -> None:
    ids = add_jobs(conn, 40)
    add_jobs(conn, 5, runner="backend")  # another runner's jobs are never taken
    claimed: dict[str, list[str]] = {}
    start = threading.Barrier(4)

    def claimer(name: str) -> None:
        taken: list[str] = []
        with connect(dev) as own:
            start.wait()
            while (claimed_job := queue.claim(own, "mpi", name, 60)) is not None:
                taken.append(str(claimed_job["id"]))
        claimed[name] = taken

    threads = [threading.Thread(target=claimer, args=(f"claimer-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [job_id for taken in claimed.values() for job_id in taken]
    assert sorted(every) == sorted(ids)  # each exactly once
    assert sum(1 for taken in claimed.values() if taken) >= 2  # really concurrent


def test_an_expired_lease_is_claimed_again_and_only_the_holder_completes(conn: Any) -> None:
    (job_id,) = add_jobs(conn, 1)
    first = queue.claim(conn, "mpi", "runner-a", 1)
    assert first is not None and first["attempts"] == 1
    assert queue.claim(conn, "mpi", "runner-b", 1) is None  # held
    second = claim_until(conn, "runner-b", 60, timeout=10)  # after the lease expired
    assert (second["id"], second["attempts"], second["claimed_by"]) == (first["id"], 2, "runner-b")
    assert queue.extend(conn, first, 60) is False
    assert queue.complete(conn, first, "a.json") is False  # taken over: its result is discarded
    assert queue.complete(conn, second, "b.json") is True
    assert queue.complete(conn, second, "b.json") is False  # and only once
    row = job(conn, job_id)
    assert (row["status"], row["completions"], row["result_path"]) == ("succeeded", 1, "b.json")


def complete_concurrently(dev: Deployment, claims: list[tuple[dict[str, Any], str]]) -> list[bool]:
    """Each claim's holder calls complete at the same moment, on its own connection."""
    results: list[bool] = []
    start = threading.Barrier(len(claims))

    def finish(claimed: dict[str, Any], path: str) -> None:
        with connect(dev) as own:
            start.wait()
            results.append(queue.complete(own, claimed, path))

    threads = [threading.Thread(target=finish, args=pair) for pair in claims]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_two_holders_racing_to_complete_complete_once(dev: Deployment, conn: Any) -> None:
    for _ in range(10):
        (job_id,) = add_jobs(conn, 1)
        stale = queue.claim(conn, "mpi", "runner-a", 1)
        assert stale is not None
        fresh = claim_until(conn, "runner-b", 60, timeout=10)
        assert sorted(complete_concurrently(dev, [(stale, "a"), (fresh, "b")])) == [False, True]
        assert job(conn, job_id)["completions"] == 1 and job(conn, job_id)["result_path"] == "b"


def test_the_heartbeat_keeps_a_running_job_from_being_claimed(
    dev: Deployment, conn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "LEASE_SECONDS", 2)
    add_jobs(conn, 1)
    held = queue.claim(conn, "mpi", "runner-a", 2)
    assert held is not None
    conninfo = conn.info.dsn + f" password={chaos.app_password(dev)}"
    heartbeat = worker.Heartbeat(conninfo, held)
    heartbeat.start()
    try:
        deadline = time.monotonic() + 6  # three leases long
        while time.monotonic() < deadline:
            assert queue.claim(conn, "mpi", "runner-b", 2) is None
            time.sleep(0.2)
    finally:
        heartbeat.stopped.set()
        heartbeat.join()
    taken = claim_until(conn, "runner-b", 60, timeout=10)  # once the beats stop, the lease runs out
    assert taken["id"] == held["id"] and taken["attempts"] == 2


def test_a_failed_attempt_waits_a_growing_backoff_and_the_last_one_fails_the_job(conn: Any) -> None:
    (job_id,) = add_jobs(conn, 1)
    for attempt in (1, 2):
        held = queue.claim(conn, "mpi", "runner", 60)
        if held is None:  # waiting out the previous backoff would take 10 s: expire it now
            conn.execute("UPDATE jobs SET lease_until = now() - interval '1 second' WHERE id = %s", (job_id,))
            held = queue.claim(conn, "mpi", "runner", 60)
        assert held is not None and held["attempts"] == attempt
        queue.fail(conn, held, f"RuntimeError: boom\x00{attempt}")
        row = job(conn, job_id)
        assert row["status"] == "queued" and row["error"] == f"RuntimeError: boom{attempt}"
        waits = conn.execute("SELECT EXTRACT(EPOCH FROM lease_until - now()) FROM jobs WHERE id = %s", (job_id,))
        seconds = float(waits.fetchone()[0])
        assert queue.RETRY_BACKOFF_SECONDS * attempt - 2 < seconds <= queue.RETRY_BACKOFF_SECONDS * attempt
        assert queue.claim(conn, "mpi", "runner", 60) is None  # not before the backoff
    conn.execute("UPDATE jobs SET lease_until = now() - interval '1 second' WHERE id = %s", (job_id,))
    held = queue.claim(conn, "mpi", "runner", 60)
    assert held is not None and held["attempts"] == 3
    queue.fail(conn, held, "RuntimeError: third")
    row = job(conn, job_id)
    assert (row["status"], row["error"], row["lease_until"]) == ("failed", "RuntimeError: third", None)
    assert queue.claim(conn, "mpi", "runner", 60) is None


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
