"""The job queue's SQL (images/common/transvidio_jobs/queue.py) against a real PostgreSQL
server (tests/pg_server.py), in a schema of its own: claims with SKIP LOCKED under
competing claimers, lease expiry and the heartbeat, backoff, exactly-once completion when
two holders race. The backend and the MPI master run this same module in the stack."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from transvidio_jobs import queue, worker

from tests import pg_server

SCHEMA = "queue_tests"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with pg_server.running() as conninfo:
        yield conninfo


def in_schema(server: str, options: str = "") -> str:
    """The server's conninfo in the tests' own schema, with `options` (server settings) added:
    what a worker's own connections (heartbeat, outcome) are given."""
    return make_conninfo(server, options=f"-c search_path={SCHEMA} {options}".strip())


def connect(server: str, options: str = "") -> psycopg.Connection[Any]:
    """A connection in the tests' own schema, committing each statement as the workers do."""
    return psycopg.connect(in_schema(server, options), autocommit=True)


@pytest.fixture
def conn(server: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        admin.execute(f"CREATE SCHEMA {SCHEMA}")
    with connect(server) as connection:
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


def test_competing_claimers_each_get_different_jobs_and_every_job_once(server: str, conn: Any) -> None:
    ids = add_jobs(conn, 40)
    add_jobs(conn, 5, runner="backend")  # another runner's jobs are never taken
    claimed: dict[str, list[str]] = {}
    start = threading.Barrier(4, timeout=10)  # a claimer that fails early fails the rest, never hangs

    def claimer(name: str) -> None:
        taken: list[str] = []
        with connect(server) as own:
            start.wait()
            # At most one more claim than there are jobs: a claim that hands out a job twice ends too.
            while len(taken) <= len(ids) and (claimed_job := queue.claim(own, "mpi", name, 60)) is not None:
                taken.append(str(claimed_job["id"]))
        claimed[name] = taken

    threads = [threading.Thread(target=claimer, args=(f"claimer-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    every = [job_id for taken in claimed.values() for job_id in taken]
    assert sorted(every) == sorted(ids)  # each exactly once
    assert sum(1 for taken in claimed.values() if taken) >= 2  # really concurrent


def test_an_expired_lease_is_claimed_again_and_only_the_holder_completes(conn: Any) -> None:
    (job_id,) = add_jobs(conn, 1)
    first = queue.claim(conn, "mpi", "runner-a", 1)
    assert first is not None and first["attempts"] == 1
    assert queue.claim(conn, "mpi", "runner-b", 1) is None  # held
    assert queue.extend(conn, first, 1) is True  # the holder's heartbeat holds it
    second = claim_until(conn, "runner-b", 60, timeout=10)  # after the lease expired
    assert (second["id"], second["attempts"], second["claimed_by"]) == (first["id"], 2, "runner-b")
    assert queue.extend(conn, first, 60) is False
    assert queue.complete(conn, first, "a.json") is False  # taken over: its result is discarded
    assert queue.complete(conn, second, "b.json") is True
    assert queue.complete(conn, second, "b.json") is False  # and only once
    row = job(conn, job_id)
    assert (row["status"], row["completions"], row["result_path"]) == ("succeeded", 1, "b.json")


def complete_concurrently(server: str, claims: list[tuple[dict[str, Any], str]]) -> list[bool]:
    """Each claim's holder calls complete at the same moment, on its own connection."""
    results: list[bool] = []
    start = threading.Barrier(len(claims), timeout=10)

    def finish(claimed: dict[str, Any], path: str) -> None:
        with connect(server) as own:
            start.wait()
            results.append(queue.complete(own, claimed, path))

    threads = [threading.Thread(target=finish, args=pair) for pair in claims]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_two_holders_racing_to_complete_complete_once(server: str, conn: Any) -> None:
    for _ in range(10):
        (job_id,) = add_jobs(conn, 1)
        stale = queue.claim(conn, "mpi", "runner-a", 1)
        assert stale is not None
        fresh = claim_until(conn, "runner-b", 60, timeout=10)
        assert sorted(complete_concurrently(server, [(stale, "a"), (fresh, "b")])) == [False, True]
        assert job(conn, job_id)["completions"] == 1 and job(conn, job_id)["result_path"] == "b"


def test_the_heartbeat_keeps_a_running_job_from_being_claimed(
    server: str, conn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "LEASE_SECONDS", 2)
    add_jobs(conn, 1)
    held = queue.claim(conn, "mpi", "runner-a", 2)
    assert held is not None
    heartbeat = worker.Heartbeat(in_schema(server), held)
    heartbeat.start()
    try:
        deadline = time.monotonic() + 6  # three leases long
        while time.monotonic() < deadline:
            assert queue.claim(conn, "mpi", "runner-b", 2) is None
            time.sleep(0.2)
    finally:
        heartbeat.stopped.set()
        heartbeat.join(5)
    assert not heartbeat.is_alive()  # it stops when told
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


def submit(conn: psycopg.Connection[Any], owner: str, runner: str = "mpi") -> tuple[int, dict[str, Any]]:
    """The statements the backend's POST /api/jobs runs, in its order and in one transaction:
    the owner's lock, the owner's active count, the insert."""
    with conn.transaction(), conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(queue.OWNER_LOCK_SQL, (queue.OWNER_LOCK_SPACE, owner))
        cur.execute(queue.ACTIVE_JOBS_SQL, (owner,))
        counted = cur.fetchone()
        assert counted is not None
        cur.execute(queue.INSERT_SQL, (str(uuid.uuid4()), owner, "u" * 32, 90, "fr", runner))
        row = cur.fetchone()
    assert row is not None
    return int(counted["count"]), dict(row)


def test_a_submission_counts_only_the_owners_unfinished_jobs_and_queues_a_claimable_one(conn: Any) -> None:
    assert submit(conn, "alice")[0] == 0
    count, inserted = submit(conn, "alice")
    assert count == 1  # the first one, queued
    assert (inserted["owner"], inserted["status"], inserted["attempts"], inserted["runner"]) == (
        "alice",
        "queued",
        0,
        "mpi",
    )
    assert submit(conn, "bob")[0] == 0  # another owner's jobs do not count
    running = queue.claim(conn, "mpi", "runner", 60)
    assert running is not None and running["owner"] == "alice"
    assert submit(conn, "alice")[0] == 2  # queued and running both count
    assert queue.complete(conn, running, "r.json") is True
    assert submit(conn, "alice")[0] == 2  # a finished one no longer does: 2 queued of 3
    submit(conn, "carol", runner="backend")
    assert queue.claim(conn, "mpi", "runner", 60)["owner"] == "alice"  # type: ignore[index]


def test_the_owner_lock_holds_back_only_the_same_owners_submission(server: str, conn: Any) -> None:
    with connect(server) as other:
        other.execute("SET lock_timeout = '200ms'")
        with conn.transaction():
            conn.execute(queue.OWNER_LOCK_SQL, (queue.OWNER_LOCK_SPACE, "alice"))
            with pytest.raises(psycopg.errors.LockNotAvailable):
                submit(other, "alice")
            assert submit(other, "bob")[0] == 0
        assert submit(other, "alice")[0] == 0  # released with the transaction


def test_a_failure_keeps_the_last_2000_characters_of_its_reason(conn: Any) -> None:
    add_jobs(conn, 1)
    held = queue.claim(conn, "mpi", "runner", 60)
    assert held is not None
    reason = "".join(f"{i:04d}" for i in range(750))  # 3000 characters
    queue.fail(conn, held, reason)
    assert job(conn, held["id"])["error"] == reason[-2000:]


def test_backends_starting_together_create_the_schema_once_without_an_error(server: str) -> None:
    failures: list[BaseException] = []
    for _ in range(5):
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
            admin.execute(f"CREATE SCHEMA {SCHEMA}")
        start = threading.Barrier(6, timeout=10)

        def create(start: threading.Barrier = start) -> None:
            try:
                with connect(server) as own:
                    start.wait()
                    queue.ensure_schema(own)
            except (psycopg.Error, threading.BrokenBarrierError) as error:  # collected, then asserted empty
                failures.append(error)

        threads = [threading.Thread(target=create) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    # Without the advisory lock, concurrent CREATE ... IF NOT EXISTS collide in the catalog.
    assert failures == []


@contextlib.contextmanager
def synchronous_standby_gone(server: str) -> Iterator[None]:
    """Every commit that waits for the synchronous standby waits on `server` (the standby it
    names never connects) until the block ends and the wait is released."""
    reload_with(server, "ALTER SYSTEM SET synchronous_standby_names = 'gone'", "gone")
    try:
        yield
    finally:
        reload_with(server, "ALTER SYSTEM RESET synchronous_standby_names", "")


def reload_with(server: str, change: str, names: str) -> None:
    """`change`, then a reload, and a wait until new sessions see `names`: the postmaster
    rereads the file when it gets to the signal, and a session forked before that (on a busy
    host) starts with the old value."""
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(change)
        admin.execute("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 10
    while True:
        with psycopg.connect(server, autocommit=True) as session:
            seen = session.execute("SHOW synchronous_standby_names").fetchone()
        if seen == (names,):
            return
        assert time.monotonic() < deadline, f"synchronous_standby_names still {seen} 10 s after the reload"
        time.sleep(0.05)


def in_thread(work: Any) -> threading.Thread:
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_a_runners_claim_lease_and_completion_do_not_wait_for_a_synchronous_standby_that_is_gone(
    server: str, conn: Any
) -> None:
    (job_id,) = add_jobs(conn, 1)
    outcome: dict[str, Any] = {}

    def accept() -> None:
        with connect(server) as api:
            add_jobs(api, 1)

    def bookkeeping() -> None:
        with connect(server, worker.BOOKKEEPING_OPTIONS) as runner:
            claimed = queue.claim(runner, "mpi", "w1", 30)
            assert claimed is not None
            outcome["extended"] = queue.extend(runner, claimed, 30)
            outcome["completed"] = queue.complete(runner, claimed, f"{job_id}/result.json")

    with synchronous_standby_gone(server):
        # What any other commit meets meanwhile, an API's accepted job: it waits.
        accepting = in_thread(accept)
        accepting.join(2)
        assert accepting.is_alive(), "the server does not make commits wait: the test proves nothing"
        runner = in_thread(bookkeeping)
        runner.join(30)  # a bound on a hang, not a timing: unbounded otherwise
        assert not runner.is_alive(), "a runner's bookkeeping waited for the gone standby"
        assert outcome == {"extended": True, "completed": True}
        assert job(conn, job_id)["status"] == "succeeded"  # seen by others: its row is not held
    accepting.join(30)
    assert not accepting.is_alive()


@pytest.mark.parametrize("outcome", ["succeeds", "fails"])
def test_an_attempts_outcome_is_recorded_when_its_claim_connection_died_while_it_ran(
    server: str, conn: Any, outcome: str
) -> None:
    (job_id,) = add_jobs(conn, 1)
    with connect(server) as claim_connection:

        def execute(claimed: dict[str, Any]) -> str:
            # What a failover or a cut does to a connection left idle for the whole run.
            conn.execute("SELECT pg_terminate_backend(%s)", (claim_connection.info.backend_pid,))
            if outcome == "fails":
                raise RuntimeError("mpirun exited 1")
            return f"{claimed['id']}/result.json"

        assert worker.run_once(claim_connection, in_schema(server), "mpi", "w1", execute) is True
        assert claim_connection.closed
    recorded = job(conn, job_id)
    if outcome == "succeeds":
        assert (recorded["status"], recorded["attempts"], recorded["completions"]) == ("succeeded", 1, 1)
    else:  # queued again at once with its reason, not held until its lease runs out
        assert (recorded["status"], recorded["error"]) == ("queued", "RuntimeError: mpirun exited 1")
