"""The backend's database routing (images/backend/app/db.py) with fake connection pools.

Reads go round-robin over healthy replicas, skip a replica that failed (for a while) or
lags, fall back to the primary, and retry a miss on the primary (read-your-writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import pytest
from app import db
from app.config import Config
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import PoolTimeout
from transvidio_jobs import worker

from tests.aio import run


class FakePool:
    """Stands for one node's pool: `connection()` yields itself, or raises `failure`."""

    def __init__(self, host: str, rows: dict[str, Any] | None = None) -> None:
        self.host = host
        self.rows = rows or {}
        self.failure: BaseException | None = None
        self.uses = 0
        self.closed = False

    async def close(self) -> None:
        self.closed = True

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[FakePool]:
        self.uses += 1
        if self.failure is not None:
            raise self.failure
        yield self


def lookup(key: str) -> Any:
    async def work(conn: Any) -> Any:
        return conn.rows.get(key)

    return work


def which_host(conn: Any) -> Any:
    async def found() -> str:
        return str(conn.host)

    return found()


def make_database(
    replicas: int = 2, rows: dict[str, Any] | None = None
) -> tuple[db.Database, FakePool, list[FakePool]]:
    """A Database whose primary and replicas are FakePools holding `rows` (default: one job)."""
    rows = {"job": "row"} if rows is None else rows
    config = Config(
        postgres_master_host="postgres-primary",
        postgres_slave_hosts=tuple(f"postgres-replica-{i}" for i in range(1, replicas + 1)),
        postgres_port=5432,
        postgres_db="transvidio",
        postgres_user="transvidio",
        postgres_password="pw",
        redis_sentinels=(("s", 26379),),
        redis_master_name="transvidio",
        redis_user="app",
        redis_password="pw",
        mpi_master_host="mpi-master",
        secret_key="k",
        uploads_dir="/u",
        outputs_dir="/o",
        outputs_internal_prefix="/_outputs/",
        dependency_timeout=1.0,
        token_digests={},
    )
    database = db.Database(config)
    primary = FakePool("postgres-primary", rows)
    fakes = [FakePool(host, rows) for host in config.postgres_slave_hosts]
    database.primary = primary  # type: ignore[assignment]
    database.replicas = {fake.host: fake for fake in fakes}  # type: ignore[misc]
    return database, primary, fakes


def test_reads_go_round_robin_over_the_replicas_and_never_to_the_primary() -> None:
    database, primary, _ = make_database()
    hosts = [run(database.read(which_host)) for _ in range(4)]
    assert hosts == ["postgres-replica-1", "postgres-replica-2", "postgres-replica-1", "postgres-replica-2"]
    assert primary.uses == 0


def test_a_failed_replica_is_skipped_for_a_while_and_its_read_goes_to_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    database, primary, (first, _second) = make_database()
    first.failure = psycopg.OperationalError("connection refused")
    assert run(database.read(which_host)) == "postgres-replica-2"
    assert first.uses == 1
    # While it is marked down it is not tried at all.
    assert [run(database.read(which_host)) for _ in range(3)] == ["postgres-replica-2"] * 3
    assert first.uses == 1 and primary.uses == 0
    # After DOWN_SECONDS it is tried again, and serves once it answers.
    first.failure = None
    clock[0] += db.DOWN_SECONDS + 0.1
    assert {run(database.read(which_host)) for _ in range(2)} == {"postgres-replica-1", "postgres-replica-2"}


def test_a_lagging_replica_is_skipped() -> None:
    database, primary, (first, _second) = make_database()
    database.lagging = {"postgres-replica-1"}
    assert [run(database.read(which_host)) for _ in range(3)] == ["postgres-replica-2"] * 3
    assert first.uses == 0 and primary.uses == 0


def test_with_no_healthy_replica_reads_fall_back_to_the_primary() -> None:
    database, _, replicas = make_database()
    database.lagging = {r.host for r in replicas}
    assert run(database.read(which_host)) == "postgres-primary"
    database, _primary, _ = make_database(0)
    assert run(database.read(which_host)) == "postgres-primary"


def test_a_miss_on_a_replica_is_read_again_on_the_primary() -> None:
    database, primary, replicas = make_database()
    for replica in replicas:
        replica.rows = {}  # the row has not replayed there yet
    assert run(database.read(lookup("job"))) == "row"
    assert primary.uses == 1 and sum(r.uses for r in replicas) == 1
    assert run(database.read(lookup("job"), primary_on_miss=False)) is None
    assert primary.uses == 1


def test_a_replica_without_the_schema_yet_counts_as_a_miss() -> None:
    database, primary, (first, _) = make_database()
    first.failure = psycopg.errors.UndefinedTable("relation jobs does not exist")
    assert run(database.read(lookup("job"))) == "row"
    assert primary.uses == 1
    assert "postgres-replica-1" not in database.down_until


def test_a_failing_primary_is_named_in_the_error() -> None:
    database, primary, _ = make_database()
    primary.failure = psycopg.OperationalError("could not connect\nDETAIL: more")
    with pytest.raises(db.DependencyDownError) as raised:
        run(database.write(which_host))
    assert raised.value.name == "postgres-primary"
    assert str(raised.value) == "postgres-primary unavailable: could not connect"


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (psycopg.errors.UndefinedTable("relation jobs does not exist"), "the jobs schema is not created yet"),
        (PoolTimeout(), "timeout"),  # a pool timeout can carry no text
    ],
)
def test_a_write_before_the_schema_or_past_the_pool_timeout_says_why(failure: Exception, reason: str) -> None:
    database, primary, _ = make_database()
    primary.failure = failure
    with pytest.raises(db.DependencyDownError) as raised:
        run(database.write(which_host))
    assert str(raised.value) == f"postgres-primary unavailable: {reason}"


class ReplicationRows(FakePool):
    def __init__(self, rows: list[tuple[str, str, float]]) -> None:
        super().__init__("postgres-primary")
        self.replication = rows

    async def execute(self, query: str) -> ReplicationRows:
        assert "pg_stat_replication" in query
        return self

    async def fetchall(self) -> list[tuple[str, str, float]]:
        return self.replication


def test_the_watcher_marks_replicas_that_do_not_stream_or_lag(monkeypatch: pytest.MonkeyPatch) -> None:
    database, _, _ = make_database(3)
    database.primary = ReplicationRows(  # type: ignore[assignment]
        [
            ("postgres_replica_1", "streaming", 0.2),
            ("postgres_replica_2", "streaming", db.MAX_LAG_SECONDS + 1),
            ("postgres_replica_3", "catchup", 0.0),
        ]
    )

    async def stop(_: float) -> None:
        raise asyncio.CancelledError

    monkeypatch.setattr(asyncio, "sleep", stop)
    with pytest.raises(asyncio.CancelledError):
        run(database.watch_replicas())
    assert database.lagging == {"postgres-replica-2", "postgres-replica-3"}


def test_after_a_failover_the_new_primary_is_no_read_target_and_the_old_one_is_once_it_streams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every node is a read candidate (any may be primary); Patroni's standbys report their
    # member name, the hostname. The node that is primary now streams from nobody.
    config = make_database(0)[0].config
    nodes = ("postgres-primary", "postgres-replica-1", "postgres-replica-2")
    database = db.Database(dataclasses.replace(config, postgres_slave_hosts=nodes))
    database.primary = ReplicationRows(  # type: ignore[assignment]
        [("postgres-primary", "streaming", 0.1), ("postgres-replica-2", "streaming", 0.3)]
    )

    async def stop(_: float) -> None:
        raise asyncio.CancelledError

    monkeypatch.setattr(asyncio, "sleep", stop)
    with pytest.raises(asyncio.CancelledError):
        run(database.watch_replicas())
    assert database.lagging == {"postgres-replica-1"}
    assert set(database.read_order()) == {"postgres-primary", "postgres-replica-2"}


def test_writes_connect_to_whichever_node_is_primary_and_reads_to_each_node() -> None:
    config = make_database(0)[0].config
    nodes = ("postgres-primary", "postgres-replica-1")
    database = db.Database(
        dataclasses.replace(config, postgres_master_host=",".join(nodes), postgres_slave_hosts=nodes)
    )
    writer = conninfo_to_dict(str(database.primary.conninfo))
    assert (writer["host"], writer["target_session_attrs"]) == ("postgres-primary,postgres-replica-1", "read-write")
    for node in nodes:
        reader = conninfo_to_dict(str(database.replicas[node].conninfo))
        assert (reader["host"], reader["target_session_attrs"]) == (node, "any")
        # A node cut off the network fails the query within seconds instead of hanging.
        assert {k: reader[k] for k in worker.CONNECTION_TIMEOUTS} == worker.CONNECTION_TIMEOUTS
    assert int(worker.CONNECTION_TIMEOUTS["tcp_user_timeout"]) <= 10000
    assert {k: writer[k] for k in worker.CONNECTION_TIMEOUTS} == worker.CONNECTION_TIMEOUTS
    # No request waits on a lock or a query longer than on any dependency, or than 5 s.
    for conninfo in (writer, *(conninfo_to_dict(str(database.replicas[n].conninfo)) for n in nodes)):
        expected = f"-c lock_timeout={int(config.dependency_timeout * 1000)} -c statement_timeout=5000"
        assert conninfo["options"] == expected


def answer_after(pool: FakePool, wait: Callable[[], Awaitable[Any]]) -> None:
    """The node takes the connection and answers once `wait()` is done."""
    pool.failure = None

    @contextlib.asynccontextmanager
    async def connection() -> AsyncIterator[FakePool]:
        pool.uses += 1
        await wait()
        yield pool

    pool.connection = connection  # type: ignore[method-assign]


def stall(pool: FakePool, until: asyncio.Event | None = None) -> None:
    """The node takes the connection and does not answer (until `until` is set, if given):
    a node cut off mid-query."""
    answer_after(pool, (until or asyncio.Event()).wait)


def test_a_replica_that_stops_answering_is_skipped_and_rested_and_the_read_is_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(db, "REPLICA_ATTEMPT_SECONDS", 0.2)
    database, primary, (first, second) = make_database()
    answered = asyncio.Event()
    stall(first, until=answered)

    async def reads() -> tuple[Any, Any]:
        served_by_the_other = await asyncio.wait_for(database.read(which_host), 5)
        assert first.uses == 1 and database.down_until["postgres-replica-1"] > time.monotonic()
        # Both stalled: the primary serves, within the request's deadline.
        database.down_until.clear()
        stall(second, until=answered)
        served_by_the_primary = await asyncio.wait_for(database.read(which_host), 5)
        answered.set()  # the stalls end: what was given up on is let go
        await asyncio.sleep(0.01)
        assert database._abandoned == set()
        return served_by_the_other, served_by_the_primary

    assert run(reads()) == ("postgres-replica-2", "postgres-primary")
    assert primary.uses == 1


def test_a_primary_that_stops_answering_is_a_503_within_the_deadline_not_a_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(db, "DEADLINE_SECONDS", 0.3)
    monkeypatch.setattr(db, "REPLICA_ATTEMPT_SECONDS", 0.1)
    database, primary, replicas = make_database(rows={})
    stall(primary)

    async def submit_and_read() -> tuple[db.DependencyDownError, db.DependencyDownError]:
        with pytest.raises(db.DependencyDownError) as written:
            await asyncio.wait_for(database.write(lookup("job")), 5)
        # A read that misses on the replicas asks the primary with what is left of its deadline.
        with pytest.raises(db.DependencyDownError) as read:
            await asyncio.wait_for(database.read(lookup("job")), 5)
        # What was given up on runs on, never cancelled (psycopg's cancel of a query on a
        # node that does not answer blocks the event loop): it is held until it ends.
        await asyncio.sleep(0.05)
        assert len(database._abandoned) == 2
        assert not any(task.done() for task in database._abandoned)
        for task in database._abandoned:
            task.cancel()  # the test's own clean-up: these stalls never end
        return written.value, read.value

    written, read = run(submit_and_read())
    assert (written.name, written.reason) == ("postgres-primary", "no answer within 0.3 s")
    assert read.name == "postgres-primary" and read.reason.startswith("no answer within 0.")
    assert replicas[0].uses == 1 and primary.uses == 2


def test_shutdown_waits_for_work_given_up_on_and_cancels_none_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db, "DEADLINE_SECONDS", 0.1)
    database, primary, _ = make_database()

    async def give_up_then_close() -> tuple[bool, bool, Any]:
        answered = asyncio.Event()
        stall(primary, until=answered)
        with pytest.raises(db.DependencyDownError):
            await database.write(lookup("job"))
        (work,) = database._abandoned
        closing = asyncio.ensure_future(database.close())
        await asyncio.sleep(0.1)
        waited = not closing.done() and not primary.closed  # the pools stay open meanwhile
        answered.set()  # the node answers at last (or TCP gives up): the work ends by itself
        await asyncio.wait_for(closing, 5)
        return waited, work.cancelled(), work.result()

    waited, cancelled, result = run(give_up_then_close())
    assert (waited, cancelled, result) == (True, False, "row")
    assert primary.closed and database._abandoned == set()


def slow(pool: FakePool, seconds: float) -> None:
    """The node answers, after `seconds`."""
    answer_after(pool, lambda: asyncio.sleep(seconds))


def test_a_read_takes_a_slow_answer_within_its_deadline_and_gives_up_on_one_past_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    database, primary, replicas = make_database(replicas=1)
    slow(replicas[0], 0.2)
    slow(primary, 0.2)
    # Within the deadline, a replica that takes its time serves the read.
    assert run(asyncio.wait_for(database.read(which_host), 5)) == "postgres-replica-1"
    # Each attempt is cut to what is left of the request's deadline, however long an attempt
    # may otherwise take: past it, the read is a 503 rather than an answer nginx no longer
    # waits for.
    monkeypatch.setattr(db, "DEADLINE_SECONDS", 0.1)
    monkeypatch.setattr(db, "REPLICA_ATTEMPT_SECONDS", 5.0)

    async def past_the_deadline() -> None:
        with pytest.raises(db.DependencyDownError):
            await asyncio.wait_for(database.read(which_host), 5)
        await asyncio.sleep(0.3)  # the answers given up on come, and are let go
        assert database._abandoned == set()

    run(past_the_deadline())


def test_work_given_up_on_is_logged_with_how_it_ended_only_when_it_failed(caplog: pytest.LogCaptureFixture) -> None:
    database, primary, _ = make_database()

    async def give_up_on(outcome: BaseException | None) -> None:
        answered = asyncio.Event()

        async def work(conn: Any) -> str:
            await answered.wait()
            if outcome is not None:
                raise outcome
            return "row"

        with pytest.raises(TimeoutError):
            await database.within(work(primary), 0.01)
        answered.set()
        await asyncio.sleep(0.01)
        assert database._abandoned == set()

    with caplog.at_level("INFO", logger="transvidio.db"):
        run(give_up_on(None))
        assert caplog.messages == []  # an answer that came late is nothing to report
        run(give_up_on(psycopg.OperationalError("Connection timed out")))
    assert caplog.messages == ["abandoned database work ended: Connection timed out"]
