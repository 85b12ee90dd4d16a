"""The reference backend: liveness, and readiness that reports every dependency."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
from redis.asyncio.sentinel import Sentinel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.config import Config

config = Config.from_env()


async def _postgres(host: str, replica: bool) -> dict[str, Any]:
    started = time.monotonic()
    async with await psycopg.AsyncConnection.connect(
        host=host,
        port=config.postgres_port,
        dbname=config.postgres_db,
        user=config.postgres_user,
        password=config.postgres_password,
        connect_timeout=max(1, int(config.dependency_timeout)),
        autocommit=True,
    ) as conn:
        cursor = await conn.execute(
            "SELECT pg_is_in_recovery(), "
            "COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0)::float"
        )
        row = await cursor.fetchone()
    assert row is not None
    in_recovery, lag = row
    status: dict[str, Any] = {"ok": in_recovery == replica, "in_recovery": in_recovery}
    if replica:
        status["replay_age_seconds"] = round(lag, 3)
    status["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
    return status


async def _redis() -> dict[str, Any]:
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(config.redis_sentinels),
        sentinel_kwargs={"password": config.redis_password, "socket_timeout": config.dependency_timeout},
        password=config.redis_password,
        socket_timeout=config.dependency_timeout,
    )
    host, port = await sentinel.discover_master(config.redis_master_name)
    master = sentinel.master_for(config.redis_master_name)
    try:
        await master.ping()
    finally:
        await master.aclose()
    return {"ok": True, "master": f"{host}:{port}"}


async def _mpi() -> dict[str, Any]:
    reader, writer = await asyncio.open_connection(config.mpi_master_host, 22)
    banner = await reader.readline()
    writer.close()
    await writer.wait_closed()
    return {"ok": banner.startswith(b"SSH-")}


async def _check(name: str, probe: Any) -> tuple[str, dict[str, Any]]:
    try:
        return name, await asyncio.wait_for(probe, timeout=config.dependency_timeout + 1)
    except Exception as error:  # noqa: BLE001 - any failure is a reportable "down"
        return name, {"ok": False, "error": f"{type(error).__name__}: {error}"[:300]}


async def health(_: Request) -> JSONResponse:
    """Liveness: the process serves requests."""
    return JSONResponse({"status": "ok"})


async def api_health(_: Request) -> JSONResponse:
    """Readiness: every dependency, each with its own status; 503 when any is down."""
    probes = [_check("postgres-primary", _postgres(config.postgres_master_host, replica=False))]
    probes += [_check(f"postgres-replica:{h}", _postgres(h, replica=True)) for h in config.postgres_slave_hosts]
    probes += [_check("redis", _redis()), _check("mpi-master", _mpi())]
    results = dict(await asyncio.gather(*probes))
    healthy = all(result["ok"] for result in results.values())
    return JSONResponse(
        {"status": "ok" if healthy else "degraded", "dependencies": results}, status_code=200 if healthy else 503
    )


app = Starlette(routes=[Route("/health", health), Route("/api/health", api_health)])
