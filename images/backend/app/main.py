"""The reference backend: uploads, jobs, and health, behind nginx.

POST /api/uploads streams a body to the shared uploads volume; POST /api/jobs records a
job on the primary (short ones run in a backend, long ones on the MPI cluster); GET
/api/jobs/{id} reads it back; results land in /outputs/<job id>/result.json, which
nginx serves. Bad input is a 4xx with a reason, a missing dependency a 503 naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from psycopg.rows import dict_row
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from transvidio_jobs import processing, queue, worker

from app.cache import Cache
from app.config import Config
from app.db import Database, DependencyDownError

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
config = Config.from_env()
HOST = socket.gethostname()
MAX_UPLOAD_BYTES = int(os.environ.get("MAX_UPLOAD_BYTES", str(500 * 1024 * 1024)))
MAX_JSON_BYTES = int(os.environ.get("MAX_JSON_BYTES", str(64 * 1024)))
MPI_THRESHOLD_SECONDS = 60  # longer jobs go to the MPI cluster
MAX_DURATION_SECONDS = 36000
# Matched whole (fullmatch): `$` would also accept a trailing newline.
LANGUAGE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})?")
UPLOAD_ID = re.compile(r"[0-9a-f]{32}")


def problem(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


def job_document(row: dict[str, Any]) -> dict[str, Any]:
    document = {
        "id": str(row["id"]),
        "status": row["status"],
        "runner": row["runner"],
        "upload_id": row["upload_id"],
        "duration_seconds": row["duration_seconds"],
        "target_language": row["target_language"],
        "attempts": row["attempts"],
        "completions": row["completions"],
        "error": row["error"],
        "created_at": row["created_at"].isoformat(),
        "updated_at": row["updated_at"].isoformat(),
    }
    if row["result_path"]:
        document["result_url"] = f"/outputs/{row['result_path']}"
    return document


# --- health -----------------------------------------------------------------------------


async def health(request: Request) -> JSONResponse:
    """Liveness: this process serves requests (and which backend answered)."""
    return JSONResponse({"status": "ok", "backend": HOST})


async def _postgres(host: str, writable: bool = False) -> dict[str, Any]:
    """One node's role as it says; `writable`: whichever node of `host` (a list) is primary."""
    started = time.monotonic()
    async with await psycopg.AsyncConnection.connect(
        host=host,
        port=config.postgres_port,
        dbname=config.postgres_db,
        user=config.postgres_user,
        password=config.postgres_password,
        connect_timeout=max(1, int(config.dependency_timeout)),
        target_session_attrs="read-write" if writable else "any",
        autocommit=True,
    ) as conn:
        cursor = await conn.execute("SELECT pg_is_in_recovery()")
        row = await cursor.fetchone()
        node = conn.info.host
    assert row is not None
    in_recovery = bool(row[0])
    status: dict[str, Any] = {"ok": not in_recovery, "role": "replica" if in_recovery else "primary"}
    if writable:
        status["node"] = node
    elif in_recovery:
        # A replica serves reads only while it streams and keeps up.
        status["lagging"] = host in request_state().db.lagging
        status["ok"] = not status["lagging"]
    status["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
    return status


async def _redis() -> dict[str, Any]:
    cache = request_state().cache
    host, port = await cache.sentinel.discover_master(config.redis_master_name)
    await cache.master.ping()
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


async def api_health(request: Request) -> JSONResponse:
    """Readiness: every dependency with its own status; 503 when any is down."""
    probes = [_check("postgres-primary", _postgres(config.postgres_master_host, writable=True))]
    probes += [_check(f"postgres:{h}", _postgres(h)) for h in config.postgres_slave_hosts]
    probes += [_check("redis", _redis()), _check("mpi-master", _mpi())]
    results = dict(await asyncio.gather(*probes))
    down = sorted(name for name, result in results.items() if not result["ok"])
    body = {"status": "degraded" if down else "ok", "down": down, "backend": HOST, "dependencies": results}
    return JSONResponse(body, status_code=503 if down else 200)


# --- uploads ------------------------------------------------------------------------------


def declared_length_problem(request: Request, limit: int, what: str) -> JSONResponse | None:
    """A 400 or 413 for a Content-Length that is malformed or over `limit`, before reading."""
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not declared.isdigit():
        return problem(400, "Content-Length must be a number")
    if int(declared) > limit:
        return problem(413, f"{what} of {declared} bytes exceeds the limit of {limit} bytes")
    return None


async def create_upload(request: Request) -> JSONResponse:
    """Streams the body to the uploads volume; never holds it in memory."""
    refused = declared_length_problem(request, MAX_UPLOAD_BYTES, "upload")
    if refused is not None:
        return refused
    upload_id = uuid.uuid4().hex
    final = os.path.join(config.uploads_dir, upload_id)
    partial = final + ".part"
    size = 0
    try:
        with open(partial, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_UPLOAD_BYTES:
                    raise OverflowError
                out.write(chunk)
    except OverflowError:
        os.unlink(partial)
        return problem(413, f"upload exceeds the limit of {MAX_UPLOAD_BYTES} bytes")
    except Exception:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    if size == 0:
        os.unlink(partial)
        return problem(400, "empty upload")
    os.replace(partial, final)
    return JSONResponse({"upload_id": upload_id, "size": size}, status_code=201)


# --- jobs ---------------------------------------------------------------------------------


def _validate(body: Any) -> tuple[str, int, str] | str:
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    unknown = sorted(set(body) - {"upload_id", "duration_seconds", "target_language"})
    if unknown:
        return f"unknown field(s): {', '.join(unknown)}"
    upload_id, duration, language = body.get("upload_id"), body.get("duration_seconds"), body.get("target_language")
    if not isinstance(upload_id, str) or not UPLOAD_ID.fullmatch(upload_id):
        return "upload_id must be the id returned by POST /api/uploads"
    if isinstance(duration, bool) or not isinstance(duration, int) or not 1 <= duration <= MAX_DURATION_SECONDS:
        return f"duration_seconds must be a whole number from 1 to {MAX_DURATION_SECONDS}"
    if not isinstance(language, str) or not LANGUAGE.fullmatch(language):
        return "target_language must be a language tag such as 'fr' or 'pt-BR'"
    if not os.path.isfile(os.path.join(config.uploads_dir, upload_id)):
        return f"upload {upload_id} does not exist"
    return upload_id, duration, language


async def read_json_body(request: Request) -> bytes | JSONResponse:
    """The body, read up to MAX_JSON_BYTES: a larger one is refused without being held."""
    refused = declared_length_problem(request, MAX_JSON_BYTES, "body")
    if refused is not None:
        return refused
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_JSON_BYTES:
            return problem(413, f"body exceeds the limit of {MAX_JSON_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def create_job(request: Request) -> JSONResponse:
    raw = await read_json_body(request)
    if isinstance(raw, JSONResponse):
        return raw
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return problem(400, f"malformed JSON: {error}")
    checked = _validate(body)
    if isinstance(checked, str):
        return problem(422, checked)
    upload_id, duration, language = checked
    runner = "mpi" if duration > MPI_THRESHOLD_SECONDS else "backend"

    async def insert(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
        # The async connection runs the same statements as the sync queue module.
        cursor = conn.cursor(row_factory=dict_row)
        await cursor.execute(
            f"INSERT INTO jobs (id, upload_id, duration_seconds, target_language, runner) "
            f"VALUES (%s, %s, %s, %s, %s) RETURNING {queue.COLUMNS}",
            (str(uuid.uuid4()), upload_id, duration, language, runner),
        )
        row = await cursor.fetchone()
        assert row is not None
        return row

    row = await request_state().db.write(insert)
    return JSONResponse(job_document(row), status_code=201)


async def get_job(request: Request) -> JSONResponse:
    job_id = request.path_params["job_id"]
    try:
        job_id = str(uuid.UUID(job_id))
    except ValueError:
        return problem(404, f"no job {job_id}")
    state = request_state()
    cached = await state.cache.get_job(job_id)
    if cached is not None:
        return JSONResponse(cached)

    async def select(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any] | None:
        cursor = conn.cursor(row_factory=dict_row)
        await cursor.execute(f"SELECT {queue.COLUMNS} FROM jobs WHERE id = %s", (job_id,))
        return await cursor.fetchone()

    row = await state.db.read(select)
    if row is None:
        return problem(404, f"no job {job_id}")
    document = job_document(row)
    if row["status"] in ("succeeded", "failed"):
        await state.cache.put_job(job_id, document)
    return JSONResponse(document)


# --- application ------------------------------------------------------------------------------


class State:
    def __init__(self) -> None:
        self.db = Database(config)
        self.cache = Cache(config)
        self.stop = threading.Event()


_state: State | None = None


def request_state() -> State:
    assert _state is not None
    return _state


def run_short_job(job: dict[str, Any]) -> str:
    return processing.run_locally(job, config.uploads_dir, config.outputs_dir, HOST)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global _state
    _state = State()
    await _state.db.open()
    watcher = asyncio.create_task(_state.db.watch_replicas())
    short_jobs = threading.Thread(target=worker.run_forever, args=("backend", run_short_job, _state.stop), daemon=True)
    short_jobs.start()
    try:
        yield
    finally:
        _state.stop.set()
        watcher.cancel()
        await _state.db.close()
        await _state.cache.close()


async def dependency_down(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, DependencyDownError)
    return problem(503, str(error))


class ServedBy:
    """Adds X-Served-By (this backend's hostname) to every response: load balancing is visible."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def send_with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-served-by", HOST.encode())]
            await send(message)

        await self.inner(scope, receive, send_with_header if scope["type"] == "http" else send)


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/api/health", api_health),
        Route("/api/uploads", create_upload, methods=["POST"]),
        Route("/api/jobs", create_job, methods=["POST"]),
        Route("/api/jobs/{job_id}", get_job),
    ],
    lifespan=lifespan,
    exception_handlers={DependencyDownError: dependency_down},
    middleware=[Middleware(ServedBy)],
)
