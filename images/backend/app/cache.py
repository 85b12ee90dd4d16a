"""Redis through Sentinel (follows a failover): a cache of finished jobs' documents.

Redis is an optimisation here: when it is down the API still answers from PostgreSQL
and /api/health reports it degraded.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis.asyncio as redis_asyncio
from redis.asyncio.sentinel import Sentinel

from app.config import Config

log = logging.getLogger("transvidio.cache")
TTL_SECONDS = 3600


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

    async def get_job(self, job_id: str) -> dict[str, Any] | None:
        try:
            raw = await self.master.get(f"job:{job_id}")
        except redis_asyncio.RedisError as error:
            log.warning("cache read skipped: %s", error)
            return None
        return json.loads(raw) if raw else None

    async def put_job(self, job_id: str, document: dict[str, Any]) -> None:
        try:
            await self.master.set(f"job:{job_id}", json.dumps(document, sort_keys=True), ex=TTL_SECONDS)
        except redis_asyncio.RedisError as error:
            log.warning("cache write skipped: %s", error)

    async def close(self) -> None:
        await self.master.aclose()
