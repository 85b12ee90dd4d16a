"""Database routing: writes to the primary, reads round-robin over healthy replicas.

Any node may be primary (Patroni fails over): writes connect through libpq's host list
with target_session_attrs=read-write, which finds whichever node is primary now. Reads go
to the nodes the primary lists as streaming standbys; a node is skipped while it is down
(for a few seconds after a failed connection) or lagging (not streaming, or replay lag
above REPLICA_MAX_LAG_SECONDS), and reads fall back to the primary. A read that finds
nothing on a replica is retried on the primary, so a client always reads its own job
right after creating it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from transvidio_jobs import worker

from app.config import Config

log = logging.getLogger("transvidio.db")
T = TypeVar("T")

DOWN_SECONDS = 5.0
MAX_LAG_SECONDS = float(os.environ.get("REPLICA_MAX_LAG_SECONDS", "5"))
STATEMENT_TIMEOUT_MS = 5000  # the API's queries are lookups and one insert: milliseconds
# A request's database work ends within this, under nginx's API read timeout (10 s): a
# server that stops answering mid-query (a node cut off: the kernel's retransmissions are
# all that is left) or a pool walking dead connections is a 503 from here, never a 504
# from nginx with the request's fate unknown.
DEADLINE_SECONDS = 7.0
# A replica slower than this is skipped (and rested) for the next one, or the primary.
REPLICA_ATTEMPT_SECONDS = 3.0
# Database work given up on ends by then: a server that does not answer fails it when TCP
# gives up (tcp_user_timeout); shutdown waits that long for it.
ABANDONED_WORK_SECONDS = int(worker.CONNECTION_TIMEOUTS["tcp_user_timeout"]) / 1000


def lock_timeout_ms(config: Config) -> int:
    """How long a request waits for a lock: as long as for any dependency."""
    return int(config.dependency_timeout * 1000)


class DependencyDownError(Exception):
    """A dependency the request needs is unavailable; the API answers 503 naming it (the
    reason, which may hold addresses and driver messages, goes to the log)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name} unavailable: {reason}")
        self.name, self.reason = name, reason


class Database:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.primary = self._pool(config.postgres_master_host, target_session_attrs="read-write")
        self.replicas = {host: self._pool(host) for host in config.postgres_slave_hosts}
        self._order = itertools.cycle(list(self.replicas) or [""])
        self.down_until: dict[str, float] = {}
        self.lagging: set[str] = set()
        # Work given up on, still running: asyncio holds tasks only weakly.
        self._abandoned: set[asyncio.Future[Any]] = set()

    def _pool(self, host: str, target_session_attrs: str = "any") -> AsyncConnectionPool:
        c = self.config
        conninfo = make_conninfo(
            host=host,
            target_session_attrs=target_session_attrs,
            port=str(c.postgres_port),
            dbname=c.postgres_db,
            user=c.postgres_user,
            password=c.postgres_password,
            connect_timeout=str(max(1, int(c.dependency_timeout))),
            # A request never waits long on the database: the owner's lock held by a
            # transaction whose client is gone (a node lost) or a query that does not finish
            # is a 503 naming PostgreSQL, not a request hanging until nginx gives up.
            options=f"-c lock_timeout={lock_timeout_ms(c)} -c statement_timeout={STATEMENT_TIMEOUT_MS}",
            **worker.CONNECTION_TIMEOUTS,
        )
        return AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=8,
            timeout=c.dependency_timeout + 1,
            open=False,
            kwargs={"autocommit": True},
            check=AsyncConnectionPool.check_connection,
            name=host,
        )

    async def open(self) -> None:
        for pool in (self.primary, *self.replicas.values()):
            await pool.open(wait=False)

    async def close(self) -> None:
        # Work given up on ends within its own bounds: waited for here, so that nothing
        # cancels it at shutdown (see `within`).
        if self._abandoned:
            await asyncio.wait(set(self._abandoned), timeout=ABANDONED_WORK_SECONDS)
        for pool in (self.primary, *self.replicas.values()):
            await pool.close()

    def read_order(self) -> list[str]:
        """Healthy replicas, starting from the next in the round-robin."""
        now = time.monotonic()
        healthy = [h for h in self.replicas if h not in self.lagging and self.down_until.get(h, 0) <= now]
        if not healthy:
            return []
        start = next(self._order)
        while start not in healthy:
            start = next(self._order)
        index = healthy.index(start)
        return healthy[index:] + healthy[:index]

    async def within(self, work: Awaitable[T], seconds: float) -> T:
        """`work`'s result, or TimeoutError once `seconds` have passed.

        Work given up on is left to end by itself, never cancelled: psycopg cancels a query
        by connecting to its server, and with a server that does not answer (its node lost)
        that connect blocks the whole event loop, every request of this backend, until TCP
        gives up (tcp_user_timeout, 8 s; seen on a swarm, reproduced with the image's
        psycopg 3.2.6 and libpq 17). Every step of the work has its own bound (the pool's
        timeout, statement_timeout, tcp_user_timeout), so it ends within seconds."""
        task = asyncio.ensure_future(work)
        done, _ = await asyncio.wait({task}, timeout=max(seconds, 0.0))
        if not done:
            self._abandoned.add(task)
            task.add_done_callback(self._forget)
            raise TimeoutError(f"no answer within {max(seconds, 0.0):.1f} s")
        return task.result()

    async def _bounded(self, name: str, work: Awaitable[T], seconds: float) -> T:
        """`work`'s result, or DependencyDownError naming `name` once `seconds` have passed."""
        try:
            return await self.within(work, seconds)
        except TimeoutError as error:
            raise DependencyDownError(name, str(error)) from None

    def _forget(self, task: asyncio.Future[Any]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("abandoned database work ended: %s", task.exception())

    async def write(
        self, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]], seconds: float | None = None
    ) -> T:
        """`work` on the primary, within `seconds` (DEADLINE_SECONDS unless given)."""
        deadline = DEADLINE_SECONDS if seconds is None else seconds
        return await self._bounded("postgres-primary", self._write(work), deadline)

    async def _write(self, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        try:
            async with self.primary.connection() as conn:
                return await work(conn)
        except psycopg.errors.UndefinedTable as error:
            raise DependencyDownError("postgres-primary", "the jobs schema is not created yet") from error
        except (psycopg.OperationalError, PoolTimeout) as error:
            raise DependencyDownError(
                "postgres-primary", str(error).splitlines()[0] if str(error) else "timeout"
            ) from error

    async def _read_on(
        self, host: str, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T | None]]
    ) -> T | None:
        async with self.replicas[host].connection() as conn:
            return await work(conn)

    async def read(
        self, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T | None]], primary_on_miss: bool = True
    ) -> T | None:
        deadline = time.monotonic() + DEADLINE_SECONDS
        for host in self.read_order():
            seconds = min(REPLICA_ATTEMPT_SECONDS, deadline - time.monotonic())
            try:
                found = await self._bounded(host, self._read_on(host, work), seconds)
                if found is not None or not primary_on_miss:
                    return found
                break  # a miss: the row may not have replayed yet, ask the primary
            except psycopg.errors.UndefinedTable:
                break  # the schema has not replayed here yet: a miss
            except (psycopg.OperationalError, PoolTimeout, DependencyDownError) as error:
                log.warning("replica %s skipped for %ss: %s", host, DOWN_SECONDS, error)
                self.down_until[host] = time.monotonic() + DOWN_SECONDS
        return await self.write(work, deadline - time.monotonic())

    async def watch_replicas(self) -> None:
        """Every 2 s, asks the primary which replicas stream and how far behind they are."""
        # Patroni's standbys connect with their member name (the hostname) as application_name.
        names = {host: host for host in self.replicas} | {host.replace("-", "_"): host for host in self.replicas}
        while True:
            try:
                # Through `within`: cancelling this watcher (at shutdown) never cancels a query.
                rows = await self.within(self._replication(), DEADLINE_SECONDS)
                fresh = {
                    names[name]
                    for name, state, lag in rows
                    if name in names and state == "streaming" and lag <= MAX_LAG_SECONDS
                }
                self.lagging = set(self.replicas) - fresh
            except (psycopg.Error, PoolTimeout, TimeoutError) as error:
                log.warning("replica lag unknown (primary unavailable): %s", error)
            await asyncio.sleep(2)

    async def _replication(self) -> list[tuple[Any, ...]]:
        async with self.primary.connection() as conn:
            cur = await conn.execute(
                "SELECT application_name, state, EXTRACT(EPOCH FROM COALESCE(replay_lag, '0'))::float "
                "FROM pg_stat_replication"
            )
            return await cur.fetchall()
