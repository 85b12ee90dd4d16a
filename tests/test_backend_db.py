"""The backend's database pools (images/backend/app/db.py) against a real PostgreSQL server
(tests/pg_server.py): what a request meets when the database holds it back.

The routing decisions are tested with fake pools in tests/test_backend_routing.py; here the
pools are real, so the bounds they set are the server's to enforce.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from app import db
from psycopg.conninfo import conninfo_to_dict
from transvidio_jobs import queue

from tests import pg_server
from tests.aio import run
from tests.local_server import LocalServer
from tests.test_backend_routing import make_database

# A hang is a failure, not a wait: far above every bound under test.
HANG_SECONDS = 30


@pytest.fixture(scope="module")
def server() -> Iterator[dict[str, str]]:
    with pg_server.running() as conninfo:
        yield {key: str(value) for key, value in conninfo_to_dict(conninfo).items()}


def database(server: dict[str, str]) -> db.Database:
    """The backend's Database, its primary and its one replica on the tests' server."""
    config = dataclasses.replace(
        make_database(0)[0].config,
        postgres_master_host=server["host"],
        postgres_slave_hosts=(server["host"],),
        postgres_port=int(server["port"]),
        postgres_db=server["dbname"],
        postgres_user=server["user"],
        postgres_password="",
    )
    return db.Database(config)


async def write_under(database: db.Database, work: Any) -> Any:
    await database.open()
    try:
        return await asyncio.wait_for(database.write(work), HANG_SECONDS)
    finally:
        await database.close()


def test_a_submission_behind_an_owner_lock_that_is_never_released_is_a_503_not_a_hang(
    server: dict[str, str],
) -> None:
    # A transaction holds alice's lock and never ends: its client is gone (a node lost), and
    # the server has not noticed yet. The backend's own submission gives up on the lock.
    async def lock(conn: psycopg.AsyncConnection[Any]) -> None:
        async with conn.transaction():
            await conn.execute(queue.OWNER_LOCK_SQL, (queue.OWNER_LOCK_SPACE, "alice"))

    conninfo = psycopg.conninfo.make_conninfo(**server)
    with psycopg.connect(conninfo) as holder:
        holder.execute(queue.OWNER_LOCK_SQL, (queue.OWNER_LOCK_SPACE, "alice"))
        backend = database(server)
        with pytest.raises(db.DependencyDownError) as raised:
            run(write_under(backend, lock))
        assert raised.value.name == "postgres-primary"
        assert "lock timeout" in raised.value.reason
    # Bob's lock is another: it goes through while alice's is held.
    with psycopg.connect(conninfo) as holder:
        holder.execute(queue.OWNER_LOCK_SQL, (queue.OWNER_LOCK_SPACE, "alice"))

        async def bobs(conn: psycopg.AsyncConnection[Any]) -> str:
            async with conn.transaction():
                await conn.execute(queue.OWNER_LOCK_SQL, (queue.OWNER_LOCK_SPACE, "bob"))
            return "done"

        assert run(write_under(database(server), bobs)) == "done"


def test_a_query_that_does_not_finish_is_a_503_not_a_hang(server: dict[str, str]) -> None:
    async def slow(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("SELECT pg_sleep(60)")

    with pytest.raises(db.DependencyDownError) as raised:
        run(write_under(database(server), slow))
    assert "statement timeout" in raised.value.reason


class FreezingProxy(LocalServer):
    """A TCP proxy to the server that can stop forwarding while keeping every connection
    open: what a client meets when the server's node is cut off (its kernel's ACKs gone
    too, which only makes the client's wait longer)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.frozen = threading.Event()
        super().__init__()

    def serve(self, connection: socket.socket) -> None:
        server = socket.create_connection(self.target)
        self.sockets.append(server)
        for source, sink in ((connection, server), (server, connection)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not self.frozen.is_set():
                    sink.sendall(data)


def test_a_primary_that_stops_answering_mid_connection_is_a_503_within_the_deadline(
    server: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Neither lock_timeout nor statement_timeout can help here (the server never sees the
    # query) and the kernel's timeouts do not fire (the proxy's kernel ACKs): only the
    # backend's own deadline ends the request.
    monkeypatch.setattr(db, "DEADLINE_SECONDS", 1.0)
    proxy = FreezingProxy(server["host"], int(server["port"]))

    async def one(conn: psycopg.AsyncConnection[Any]) -> int:
        cursor = await conn.execute("SELECT 1")
        row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def before_and_after_the_freeze(backend: db.Database) -> tuple[int, db.DependencyDownError]:
        await backend.open()
        try:
            answered = await asyncio.wait_for(backend.write(one), HANG_SECONDS)
            proxy.frozen.set()
            with pytest.raises(db.DependencyDownError) as raised:
                await asyncio.wait_for(backend.write(one), HANG_SECONDS)
            return answered, raised.value
        finally:
            proxy.close()
            await asyncio.wait_for(backend.close(), HANG_SECONDS)

    backend = database(dict(server, host="127.0.0.1", port=str(proxy.port)))
    answered, refused = run(before_and_after_the_freeze(backend))
    assert answered == 1
    assert (refused.name, refused.reason) == ("postgres-primary", "no answer within 1.0 s")
