"""The reference backend: uploads, jobs, results and health, behind nginx.

Every /api/ route needs a bearer token (one of the stack's `backend.apiTokens`); what a
token uploads and the jobs it creates belong to it, and another token finds none of them.
POST /api/uploads streams a body to the shared uploads volume; POST /api/jobs records a
job on the primary (short ones run in a backend, long ones on the MPI cluster); GET
/api/jobs/{id} reads it back; GET /api/jobs/{id}/result serves the result (nginx sends
the file, from an internal location), with the token or a signed link that expires.
Bad input is a 4xx with a reason, a missing dependency a 503 naming it (the detail goes
to the log, not to the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from transvidio_jobs import processing, queue, worker

from app.cache import Cache
from app.config import Config
from app.db import Database, DependencyDownError

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
log = logging.getLogger("transvidio.api")
config = Config.from_env()
HOST = socket.gethostname()
MPI_THRESHOLD_SECONDS = 60  # longer jobs go to the MPI cluster
# Matched whole (fullmatch): `$` would also accept a trailing newline.
LANGUAGE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})?")
UPLOAD_ID = processing.UPLOAD_ID_RE
# A body must keep coming: after BODY_GRACE_SECONDS, one that averages less than
# MIN_BODY_BYTES_PER_SECOND is cut off (408), so a client trickling bytes holds nothing for long.
BODY_GRACE_SECONDS = 10.0
MIN_BODY_BYTES_PER_SECOND = 1024
FREE_DISK_CHECK_BYTES = 8 * 1024 * 1024  # free space is checked again after each of these
RESULT_LINK_SECONDS = 3600
HEALTH_CACHE_SECONDS = 1.0
RETENTION_SWEEP_SECONDS = 20.0
PARTIAL_UPLOAD_SECONDS = 3600  # a partial upload untouched this long belongs to a dead request


class ApiError(Exception):
    """A request the API refuses: a 4xx (or 503/507) with a reason for the client."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


def problem(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


# --- authentication and signed links ------------------------------------------------------

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="transvidio"'}
INVALID = ', error="invalid_token"'


def token_owner(request: Request) -> str:
    """The name of the API token the request carries; 401 without a valid one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "a bearer token is required: Authorization: Bearer <token>", CHALLENGE)
    digest = hashlib.sha256(token.strip().encode()).hexdigest()
    for known, name in config.token_digests.items():
        if hmac.compare_digest(known, digest):
            return name
    raise ApiError(401, "the bearer token is not valid", {"WWW-Authenticate": CHALLENGE["WWW-Authenticate"] + INVALID})


def link_signature(job_id: str, expires: int) -> str:
    message = f"result:{job_id}:{expires}".encode()
    return hmac.new(config.secret_key.encode(), message, hashlib.sha256).hexdigest()


def result_link(job_id: str, now: float | None = None) -> str:
    """A link to the job's result that works without the token until it expires."""
    expires = int((now if now is not None else time.time()) + RESULT_LINK_SECONDS)
    return f"/api/jobs/{job_id}/result?expires={expires}&signature={link_signature(job_id, expires)}"


def signed_link_valid(job_id: str, expires: str, signature: str) -> bool:
    if not expires.isdigit() or int(expires) < time.time():
        return False
    return hmac.compare_digest(link_signature(job_id, int(expires)), signature)


def job_document(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "owner": row["owner"],
        "status": row["status"],
        "runner": row["runner"],
        "upload_id": row["upload_id"],
        "duration_seconds": row["duration_seconds"],
        "target_language": row["target_language"],
        "attempts": row["attempts"],
        "completions": row["completions"],
        "error": row["error"],
        "result_path": row["result_path"],
        "created_at": row["created_at"].isoformat(),
        "updated_at": row["updated_at"].isoformat(),
    }


def public_document(document: dict[str, Any]) -> dict[str, Any]:
    """What a client sees: no file paths; a fresh signed link once there is a result."""
    shown = {k: v for k, v in document.items() if k != "result_path"}
    if document.get("result_path"):
        shown["result_url"] = result_link(document["id"])
    return shown


# --- health -----------------------------------------------------------------------------


async def health(request: Request) -> JSONResponse:
    """Liveness: this process serves requests (and which backend answered)."""
    return JSONResponse({"status": "ok", "backend": HOST})


async def _postgres(host: str, writable: bool = False) -> dict[str, Any]:
    """One node's role as it says; `writable`: whichever node of `host` (a list) is primary."""
    started = time.monotonic()
    async with await psycopg.AsyncConnection.connect(
        # A node that stops answering fails the probe within seconds: it is never cancelled.
        make_conninfo(**worker.CONNECTION_TIMEOUTS),
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


async def _check(name: str, probe: Awaitable[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The probe's answer, or "down" with the kind of its failure (the caller bounds the probe)."""
    try:
        return name, await probe
    except Exception as error:  # noqa: BLE001 - any failure is a reportable "down"
        # The kind of failure for the caller; its text (addresses, driver messages) for the log.
        log.warning("readiness: %s is down: %s: %s", name, type(error).__name__, error)
        return name, {"ok": False, "error": type(error).__name__}


async def readiness() -> tuple[int, dict[str, Any]]:
    seconds = config.dependency_timeout + 1
    db = request_state().db
    # A PostgreSQL probe is given up on, never cancelled (Database.within says why); the
    # others are cancelled at their bound.
    probes = [_check("postgres-primary", db.within(_postgres(config.postgres_master_host, writable=True), seconds))]
    probes += [_check(f"postgres:{h}", db.within(_postgres(h), seconds)) for h in config.postgres_slave_hosts]
    probes += [
        _check("redis", asyncio.wait_for(_redis(), seconds)),
        _check("mpi-master", asyncio.wait_for(_mpi(), seconds)),
    ]
    results = dict(await asyncio.gather(*probes))
    down = sorted(name for name, result in results.items() if not result["ok"])
    body = {"status": "degraded" if down else "ok", "down": down, "backend": HOST, "dependencies": results}
    return (503 if down else 200), body


async def api_health(request: Request) -> JSONResponse:
    """Readiness: every dependency with its own status; 503 when any is down.

    One probe round serves every call within HEALTH_CACHE_SECONDS: a flood of readiness
    calls opens no more connections than one.
    """
    token_owner(request)
    state = request_state()
    async with state.health_lock:
        if time.monotonic() - state.health_at >= HEALTH_CACHE_SECONDS:
            state.health = await readiness()
            state.health_at = time.monotonic()
        status, body = state.health
    return JSONResponse(body, status_code=status)


# --- request bodies --------------------------------------------------------------------------


def declared_length(request: Request, limit: int, what: str) -> int | None:
    """The Content-Length, refused (400, 413) when malformed or over `limit`, before reading."""
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not declared.isdigit():
        raise ApiError(400, "Content-Length must be a number")
    if int(declared) > limit:
        raise ApiError(413, f"{what} of {declared} bytes exceeds the limit of {limit} bytes")
    return int(declared)


async def body_chunks(request: Request, limit: int, what: str) -> AsyncIterator[bytes]:
    """The body as it arrives, never more than `limit` bytes, cut off when it trickles."""
    started, size = time.monotonic(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"{what} exceeds the limit of {limit} bytes")
        elapsed = time.monotonic() - started
        if elapsed > BODY_GRACE_SECONDS and size < MIN_BODY_BYTES_PER_SECOND * elapsed:
            raise ApiError(
                408,
                f"{what} too slow: {size} bytes in {elapsed:.0f} s "
                f"(at least {MIN_BODY_BYTES_PER_SECOND} bytes a second after {BODY_GRACE_SECONDS:.0f} s)",
            )
        yield chunk


def free_disk_bytes(path: str) -> int:
    usage = shutil.disk_usage(path)
    return usage.free


def check_free_disk(path: str, incoming: int) -> None:
    """507 when `incoming` more bytes would leave less than the stack's reserve free."""
    reserve = config.limits.min_free_disk_bytes
    free = free_disk_bytes(path)
    if free - incoming < reserve:
        raise ApiError(
            507, f"not enough free space for this upload: {free} bytes free, {reserve} must stay free (minFreeDisk)"
        )


async def create_upload(request: Request) -> JSONResponse:
    """Streams the body to the owner's directory on the uploads volume; never holds it in memory."""
    owner = token_owner(request)
    limits = config.limits
    declared = declared_length(request, limits.max_upload_bytes, "upload")
    directory = os.path.join(config.uploads_dir, owner)
    os.makedirs(directory, exist_ok=True)
    check_free_disk(directory, declared or 0)
    upload_id = uuid.uuid4().hex
    final = os.path.join(directory, upload_id)
    partial = final + ".part"
    size, checked = 0, 0
    try:
        with open(partial, "xb") as out:
            async for chunk in body_chunks(request, limits.max_upload_bytes, "upload"):
                out.write(chunk)
                size += len(chunk)
                if declared is None and size - checked >= FREE_DISK_CHECK_BYTES:
                    check_free_disk(directory, 0)
                    checked = size
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    if size == 0:
        os.unlink(partial)
        raise ApiError(400, "empty upload")
    os.replace(partial, final)
    return JSONResponse({"upload_id": upload_id, "size": size}, status_code=201)


async def read_json(request: Request) -> Any:
    """The JSON body, read up to the JSON limit: a larger one is refused without being held."""
    limit = config.limits.max_json_bytes
    declared_length(request, limit, "body")
    raw = b"".join([chunk async for chunk in body_chunks(request, limit, "body")])
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"malformed JSON: {error}") from None


# --- jobs ---------------------------------------------------------------------------------


def validate_job(owner: str, body: Any) -> tuple[str, int, str]:
    """The fields of a new job; 422 with the reason for the first one that is wrong."""
    if not isinstance(body, dict):
        raise ApiError(422, "the body must be a JSON object")
    unknown = sorted(set(body) - {"upload_id", "duration_seconds", "target_language"})
    if unknown:
        raise ApiError(422, f"unknown field(s): {', '.join(unknown)}")
    upload_id, duration, language = body.get("upload_id"), body.get("duration_seconds"), body.get("target_language")
    longest = config.limits.max_job_seconds
    if not isinstance(upload_id, str) or not UPLOAD_ID.fullmatch(upload_id):
        raise ApiError(422, "upload_id must be the id returned by POST /api/uploads")
    if isinstance(duration, bool) or not isinstance(duration, int) or not 1 <= duration <= longest:
        raise ApiError(422, f"duration_seconds must be a whole number from 1 to {longest}")
    if not isinstance(language, str) or not LANGUAGE.fullmatch(language):
        raise ApiError(422, "target_language must be a language tag such as 'fr' or 'pt-BR'")
    # Another token's upload is, to this one, an upload that does not exist.
    if not os.path.isfile(os.path.join(config.uploads_dir, owner, upload_id)):
        raise ApiError(422, f"upload {upload_id} does not exist")
    return upload_id, duration, language


async def create_job(request: Request) -> JSONResponse:
    owner = token_owner(request)
    upload_id, duration, language = validate_job(owner, await read_json(request))
    runner = "mpi" if duration > MPI_THRESHOLD_SECONDS else "backend"
    limit = config.limits.max_active_jobs_per_token

    async def insert(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
        # The async connection runs the same statements as the sync queue module.
        async with conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(queue.OWNER_LOCK_SQL, (queue.OWNER_LOCK_SPACE, owner))
            await cursor.execute(queue.ACTIVE_JOBS_SQL, (owner,))
            active = await cursor.fetchone()
            if active is not None and active["count"] >= limit:
                raise queue.TooManyJobsError
            await cursor.execute(queue.INSERT_SQL, (str(uuid.uuid4()), owner, upload_id, duration, language, runner))
            row = await cursor.fetchone()
        assert row is not None
        return row

    try:
        row = await request_state().db.write(insert)
    except queue.TooManyJobsError:
        raise ApiError(
            429, f"token {owner} already has {limit} jobs queued or running (maxActiveJobsPerToken)"
        ) from None
    return JSONResponse(public_document(job_document(row)), status_code=201)


async def find_job(job_id_text: str, owner: str | None) -> dict[str, Any]:
    """The job's document, from the cache or the database; 404 unless `owner` owns it
    (None: the caller proved access another way)."""
    try:
        job_id = str(uuid.UUID(job_id_text))
    except ValueError:
        raise ApiError(404, f"no job {job_id_text}") from None
    state = request_state()
    document = await state.cache.get_job(job_id)
    if document is None:

        async def select(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any] | None:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(f"SELECT {queue.COLUMNS} FROM jobs WHERE id = %s", (job_id,))
            return await cursor.fetchone()

        row = await state.db.read(select)
        if row is None:
            raise ApiError(404, f"no job {job_id}")
        document = job_document(row)
        if document["status"] in ("succeeded", "failed"):
            await state.cache.put_job(job_id, document)
    if owner is not None and document.get("owner") != owner:
        raise ApiError(404, f"no job {job_id}")
    return document


async def get_job(request: Request) -> JSONResponse:
    owner = token_owner(request)
    return JSONResponse(public_document(await find_job(request.path_params["job_id"], owner)))


async def get_result(request: Request) -> Response:
    """The result file, sent by nginx from its internal location (X-Accel-Redirect)."""
    job_id = request.path_params["job_id"]
    expires, signature = request.query_params.get("expires"), request.query_params.get("signature")
    if expires is not None or signature is not None:
        if not signed_link_valid(job_id, expires or "", signature or ""):
            raise ApiError(403, "the result link is not valid or has expired: ask GET /api/jobs/{id} for a new one")
        document = await find_job(job_id, owner=None)
    else:
        document = await find_job(job_id, token_owner(request))
    if document["status"] != "succeeded" or not document.get("result_path"):
        raise ApiError(404, f"job {document['id']} has no result (status {document['status']})")
    if not os.path.isfile(os.path.join(config.outputs_dir, document["result_path"])):
        raise ApiError(410, f"the result of job {document['id']} has expired (outputRetentionHours)")
    return Response(
        status_code=200,
        media_type="application/json",
        headers={"X-Accel-Redirect": config.outputs_internal_prefix + document["result_path"]},
    )


# --- retention ----------------------------------------------------------------------------------


def sweep(uploads_dir: str, outputs_dir: str, now: float) -> list[str]:
    """Deletes uploads, partial uploads and results past their retention; returns what went.

    Every backend sweeps: a file another one removed first is simply gone.
    """
    limits = config.limits
    removed = []
    upload_before = now - limits.upload_retention_hours * 3600
    partial_before = now - PARTIAL_UPLOAD_SECONDS
    output_before = now - limits.output_retention_hours * 3600
    with contextlib.suppress(FileNotFoundError):
        for owner in os.scandir(uploads_dir):
            if not owner.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(owner.path):
                with contextlib.suppress(FileNotFoundError):
                    before = partial_before if entry.name.endswith(".part") else upload_before
                    if entry.stat(follow_symlinks=False).st_mtime < before:
                        os.unlink(entry.path)
                        removed.append(entry.path)
    with contextlib.suppress(FileNotFoundError):
        for job in os.scandir(outputs_dir):
            with contextlib.suppress(FileNotFoundError):
                if job.is_dir(follow_symlinks=False) and job.stat(follow_symlinks=False).st_mtime < output_before:
                    shutil.rmtree(job.path)
                    removed.append(job.path)
    return removed


def sweep_forever(stop: threading.Event) -> None:
    while not stop.wait(RETENTION_SWEEP_SECONDS):
        try:
            for path in sweep(config.uploads_dir, config.outputs_dir, time.time()):
                log.info("retention: removed %s", path)
        except OSError as error:
            log.warning("retention sweep failed: %s", error)


# --- application ------------------------------------------------------------------------------


class State:
    def __init__(self) -> None:
        self.db = Database(config)
        self.cache = Cache(config)
        self.stop = threading.Event()
        self.health_lock = asyncio.Lock()
        self.health: tuple[int, dict[str, Any]] = (503, {})
        self.health_at = -HEALTH_CACHE_SECONDS


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
    background = [
        threading.Thread(target=worker.run_forever, args=("backend", run_short_job, _state.stop), daemon=True),
        threading.Thread(target=sweep_forever, args=(_state.stop,), daemon=True),
    ]
    for thread in background:
        thread.start()
    try:
        yield
    finally:
        _state.stop.set()
        watcher.cancel()
        await _state.db.close()
        await _state.cache.close()


async def refused(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return problem(error.status, error.reason, error.headers)


async def dependency_down(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, DependencyDownError)
    log.warning("%s %s: %s unavailable: %s", request.method, request.url.path, error.name, error.reason)
    return problem(503, f"{error.name} unavailable")


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
        Route("/api/jobs/{job_id}/result", get_result),
    ],
    lifespan=lifespan,
    exception_handlers={ApiError: refused, DependencyDownError: dependency_down},
    middleware=[Middleware(ServedBy)],
)
