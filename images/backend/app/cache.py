"""Redis through Sentinel (follows a failover): a cache of finished jobs' documents.

Redis is an optimisation here: when it is down the API still answers from PostgreSQL
and /api/health reports it degraded. A cache operation never holds a request long: it
ends within DEADLINE_SECONDS, and after Redis failed to answer, requests skip the cache
for REST_SECONDS.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as redis_asyncio
from redis.asyncio.sentinel import Sentinel

from app.config import Config

log = logging.getLogger("transvidio.cache")
T = TypeVar("T")
TTL_SECONDS = 3600
# Redis answers in milliseconds. An operation still waiting after this is on a master or a
# Sentinel that does not answer (its node cut off, until the Sentinels promote a replica):
# its socket timeouts add up (a Sentinel asked, then the master; every request queued
# behind the pool's connect), and with the database's deadline (db.DEADLINE_SECONDS)
# after it, the API's answer would miss nginx's read timeout (10 s): a 504.
DEADLINE_SECONDS = 1.0
# After Redis failed to answer, requests skip the cache this long instead of each paying
# the deadline again, as db.DOWN_SECONDS rests a replica.
REST_SECONDS = 5.0


class Cache:
    def __init__(self, config: Config) -> None:
        self.sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(config.redis_sentinels),
            # The app's own user on the Sentinels (discovery only) and on the data nodes (its keys only).
            sentinel_kwargs={
                "username": config.redis_user,
                "password": config.redis_password,
                "socket_timeout": config.dependency_timeout,
            },
            username=config.redis_user,
            password=config.redis_password,
            socket_timeout=config.dependency_timeout,
            socket_connect_timeout=config.dependency_timeout,
        )
        self.master: redis_asyncio.Redis = self.sentinel.master_for(config.redis_master_name)
        self.resting_until = 0.0

    async def _bounded(self, what: str, operation: Callable[[], Awaitable[T]]) -> T | None:
        """`operation`'s result, or None (logged) when Redis refuses it, fails or does not
        answer within DEADLINE_SECONDS; the last two rest the cache."""
        if time.monotonic() < self.resting_until:
            return None
        try:
            # Cancelled at the deadline: redis-py closes a connection whose command it
            # leaves, so no later command reads this one's answer.
            return await asyncio.wait_for(operation(), DEADLINE_SECONDS)
        except (redis_asyncio.ConnectionError, redis_asyncio.TimeoutError, TimeoutError) as error:
            self.resting_until = time.monotonic() + REST_SECONDS
            reason = str(error) or f"no answer within {DEADLINE_SECONDS} s"
            log.warning("cache %s skipped (the cache rests %s s): %s", what, REST_SECONDS, reason)
        except redis_asyncio.RedisError as error:
            # Redis answered (NOREPLICAS, READONLY...): it is reachable, the next request
            # may use it.
            log.warning("cache %s skipped: %s", what, error)
        return None

    async def get_job(self, job_id: str) -> dict[str, Any] | None:
        raw = await self._bounded("read", lambda: self.master.get(f"job:{job_id}"))
        return json.loads(raw) if raw else None

    async def put_job(self, job_id: str, document: dict[str, Any]) -> None:
        text = json.dumps(document, sort_keys=True)
        await self._bounded("write", lambda: self.master.set(f"job:{job_id}", text, ex=TTL_SECONDS))

    async def close(self) -> None:
        await self.master.aclose()
