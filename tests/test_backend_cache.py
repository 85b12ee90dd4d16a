"""The backend's cache (images/backend/app/cache.py): what a request meets when Redis or a
Sentinel refuses, fails or stops answering.

A request never waits on the cache longer than its deadline, and after Redis did not
answer, requests skip it for a while instead of each paying the deadline: the API's answer
stays within nginx's read timeout while a master is cut off and the Sentinels have not
promoted a replica yet (seen on a swarm as a 504: a Sentinel asked, then the master, each
to its socket timeout, with every request queued behind the pool's connect).

Fakes stand in for the client where only the cache's own logic is under test; the real
redis-py client talks to a local server that speaks just enough RESP (a Sentinel naming
itself as the master) where the client's behaviour is what the cache relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as redis_asyncio
from app import cache as cache_module
from app import db
from app.config import Config

from components.render import API_READ_TIMEOUT_SECONDS
from tests.aio import run
from tests.local_server import LocalServer
from tests.test_backend_api import ENV

# A hang is a failure, not a wait: far above every bound under test.
HANG_SECONDS = 30
# The deadline the tests set: short, and far below the client's socket timeouts (2 s).
DEADLINE = 0.2


class FakeRedis:
    """The master's client: `failure` raised by every command, or `hang` never answering."""

    def __init__(self, failure: Exception | None = None, hang: bool = False) -> None:
        self.failure, self.hang = failure, hang
        self.values: dict[str, tuple[str, int]] = {}
        self.commands: list[str] = []

    async def _answer(self, command: str) -> None:
        self.commands.append(command)
        if self.hang:
            await asyncio.Event().wait()
        if self.failure:
            raise self.failure

    async def get(self, key: str) -> str | None:
        await self._answer(f"GET {key}")
        return self.values[key][0] if key in self.values else None

    async def set(self, key: str, value: str, ex: int) -> None:
        await self._answer(f"SET {key}")
        self.values[key] = (value, ex)

    async def aclose(self) -> None:
        pass


def cache_with(fake: FakeRedis) -> cache_module.Cache:
    cache = cache_module.Cache(Config.from_env(ENV))
    cache.master = fake  # type: ignore[assignment]
    return cache


def cache_on(port: int) -> cache_module.Cache:
    """The real client, its one Sentinel on a local port."""
    return cache_module.Cache(Config.from_env({**ENV, "REDIS_SENTINELS": f"127.0.0.1:{port}"}))


async def read_then_close(cache: cache_module.Cache, *job_ids: str) -> list[Any]:
    """Each job read in turn, a hang failing the test; then the cache closed."""
    try:
        return [await asyncio.wait_for(cache.get_job(job_id), HANG_SECONDS) for job_id in job_ids]
    finally:
        await cache.close()


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "transvidio.cache"]


def test_the_cache_keeps_a_document_for_an_hour_under_its_job_key() -> None:
    fake = FakeRedis()
    cache = cache_with(fake)
    run(cache.put_job("42", {"b": 1, "a": 2}))
    assert fake.values == {"job:42": ('{"a": 2, "b": 1}', 3600)}
    assert run(cache.get_job("42")) == {"a": 2, "b": 1}
    assert run(cache.get_job("43")) is None


def test_a_job_read_at_every_deadline_still_answers_before_nginx_gives_up_on_it() -> None:
    # The longest a GET of a job takes: the cache read, the database read, the cache write,
    # each to its deadline. Past nginx's read timeout the client gets a 504, whatever the
    # backend answers afterwards.
    worst_case = cache_module.DEADLINE_SECONDS + db.DEADLINE_SECONDS + cache_module.DEADLINE_SECONDS
    assert worst_case < API_READ_TIMEOUT_SECONDS


def test_a_redis_that_is_down_is_a_miss_and_is_not_asked_again_while_the_cache_rests(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRedis(redis_asyncio.ConnectionError("master is gone"))
    cache = cache_with(fake)
    assert run(cache.get_job("42")) is None
    # Resting: neither a write nor a read reaches Redis, and nothing more is logged.
    run(cache.put_job("42", {"a": 1}))
    assert run(cache.get_job("42")) is None
    assert fake.commands == ["GET job:42"]
    assert messages(caplog) == ["cache read skipped (the cache rests 5.0 s): master is gone"]
    # The rest is counted from the failure: once it is over, Redis is asked again.
    assert cache.resting_until - time.monotonic() == pytest.approx(cache_module.REST_SECONDS, abs=1)
    monkeypatch.setattr(cache, "resting_until", time.monotonic())
    run(cache.put_job("42", {"a": 1}))
    assert fake.commands == ["GET job:42", "SET job:42"]
    assert messages(caplog)[1:] == ["cache write skipped (the cache rests 5.0 s): master is gone"]


def test_a_redis_that_refuses_a_write_is_still_asked_for_the_next_request(caplog: pytest.LogCaptureFixture) -> None:
    # An answer (here: too few replicas to accept a write) proves Redis reachable.
    fake = FakeRedis(redis_asyncio.ResponseError("NOREPLICAS Not enough good replicas to write."))
    cache = cache_with(fake)
    run(cache.put_job("42", {"a": 1}))
    assert run(cache.get_job("42")) is None
    assert fake.commands == ["SET job:42", "GET job:42"]
    assert messages(caplog) == [
        "cache write skipped: NOREPLICAS Not enough good replicas to write.",
        "cache read skipped: NOREPLICAS Not enough good replicas to write.",
    ]


def test_a_redis_that_never_answers_is_a_miss_at_the_deadline_and_rests_the_cache(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_module, "DEADLINE_SECONDS", DEADLINE)
    fake = FakeRedis(hang=True)
    assert run(read_then_close(cache_with(fake), "42", "42")) == [None, None]
    assert fake.commands == ["GET job:42"]
    assert messages(caplog) == [f"cache read skipped (the cache rests 5.0 s): no answer within {DEADLINE} s"]


# --- the real client against a local server -------------------------------------------------------


def _bulk(value: object) -> bytes:
    text = str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(text), text)


class RespServer(LocalServer):
    """A Redis master and the Sentinel that names it, on one local port, speaking RESP2:
    AUTH and CLIENT are accepted, SENTINEL MASTERS names this port, GET and SET keep
    values. `delay` holds every answer back; with `silent`, nothing is ever answered (a
    node cut off, whose kernel still accepted the connection)."""

    def __init__(self, silent: bool = False) -> None:
        self.silent, self.delay = silent, 0.0
        self.values: dict[str, str] = {}
        super().__init__()

    def serve(self, connection: socket.socket) -> None:
        with contextlib.suppress(OSError, ValueError), connection.makefile("rb") as stream:
            while header := stream.readline():
                arguments = []
                for _ in range(int(header[1:])):
                    length = int(stream.readline()[1:])
                    arguments.append(stream.read(length + 2)[:-2].decode())
                if not self.silent:
                    time.sleep(self.delay)
                    connection.sendall(self._answer(arguments))

    def _answer(self, arguments: list[str]) -> bytes:
        command = arguments[0].upper()
        if command == "SENTINEL":
            fields = ["name", "transvidio", "ip", "127.0.0.1", "port", self.port, "flags", "master"]
            fields += ["num-other-sentinels", 0]
            return b"*1\r\n*%d\r\n%s" % (len(fields), b"".join(_bulk(field) for field in fields))
        if command == "GET":
            value = self.values.get(arguments[1])
            return b"$-1\r\n" if value is None else _bulk(value)
        if command == "SET":
            self.values[arguments[1]] = arguments[2]
        return b"+OK\r\n"


@contextlib.contextmanager
def serving(silent: bool = False) -> Iterator[RespServer]:
    server = RespServer(silent)
    try:
        yield server
    finally:
        server.close()


def test_a_sentinel_that_never_answers_is_a_miss_at_the_deadline_not_at_the_clients_timeouts(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The master is found through the Sentinels inside the same deadline.
    monkeypatch.setattr(cache_module, "DEADLINE_SECONDS", DEADLINE)
    with serving(silent=True) as sentinel:
        assert run(read_then_close(cache_on(sentinel.port), "42", "42")) == [None, None]
        assert sentinel.connections == 1  # the second read did not try
    assert messages(caplog) == [f"cache read skipped (the cache rests 5.0 s): no answer within {DEADLINE} s"]


def test_a_command_left_at_the_deadline_leaves_no_answer_for_the_next_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # The deadline cancels the command; redis-py then closes its connection. Were it kept,
    # the late answer (job 1's document) would be read as the next command's (job 2's).
    monkeypatch.setattr(cache_module, "DEADLINE_SECONDS", DEADLINE)
    monkeypatch.setattr(cache_module, "REST_SECONDS", 0.0)
    with serving() as server:
        cache = cache_on(server.port)
        server.values = {"job:1": '{"id": "1"}', "job:2": '{"id": "2"}'}

        async def late_then_on_time() -> tuple[Any, Any, Any]:
            try:
                before = await asyncio.wait_for(cache.get_job("2"), HANG_SECONDS)
                server.delay = 3 * DEADLINE
                late = await asyncio.wait_for(cache.get_job("1"), HANG_SECONDS)
                server.delay = 0.0
                return before, late, await asyncio.wait_for(cache.get_job("2"), HANG_SECONDS)
            finally:
                await cache.close()

        assert run(late_then_on_time()) == ({"id": "2"}, None, {"id": "2"})


def test_the_cache_asks_the_configured_sentinels_as_the_app_user() -> None:
    cache = cache_module.Cache(Config.from_env(ENV))
    sentinels = [
        (c.connection_pool.connection_kwargs["host"], c.connection_pool.connection_kwargs["port"])
        for c in cache.sentinel.sentinels
    ]
    assert sentinels == [("sentinel-0", 26379), ("sentinel-1", 26380)]
    assert {
        (c.connection_pool.connection_kwargs["username"], c.connection_pool.connection_kwargs["password"])
        for c in cache.sentinel.sentinels
    } == {("app", "redis-password")}
    assert cache.master.connection_pool.service_name == "transvidio"  # type: ignore[attr-defined]
    master = cache.master.connection_pool.connection_kwargs
    assert (master["username"], master["password"]) == ("app", "redis-password")
