"""The backend's request handlers (images/backend/app/main.py) and its env contract
(config.py), driven through the ASGI app itself (the cache: tests/test_backend_cache.py).

PostgreSQL is a fake here (the queue's SQL is proven against the real server in
tests/e2e/test_images_behaviour.py); what is under test is what the handlers promise: no
valid token is a 401, a token sees only what it made, bad input is a 4xx with a reason,
uploads are streamed and bounded in size, time and disk, a job's runner follows its
duration, a token's active jobs are capped, finished jobs are cached, results are served
by nginx through an internal redirect, with the token or a signed link, retention removes
what is old, a missing dependency is a 503 naming it and nothing more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile
import time
import types
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, MutableMapping
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from starlette.requests import Request

from tests.aio import run

# The secrets as the stack delivers them: files, their paths in <NAME>_FILE.
SECRETS_DIR = pathlib.Path(tempfile.mkdtemp(prefix="transvidio-secrets-"))
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789"}
SECRETS = {
    "POSTGRES_PASSWORD": "app-password",
    "REDIS_PASSWORD": "redis-password",
    "SECRET_KEY": "secret-key",
    # As render.api_tokens_file writes it: names and hashes, no token.
    "API_TOKENS": "".join(f"{name} {hashlib.sha256(t.encode()).hexdigest()}\n" for name, t in TOKENS.items()),
}
for _name, _value in SECRETS.items():
    (SECRETS_DIR / _name.lower()).write_text(_value + "\n")
ENV = {
    "POSTGRES_MASTER_HOST": "postgres-primary,postgres-replica-1,postgres-replica-2",
    "POSTGRES_SLAVE_HOSTS": "postgres-primary,postgres-replica-1,postgres-replica-2",
    "POSTGRES_DB": "transvidio",
    "POSTGRES_USER": "transvidio_app",
    "REDIS_SENTINELS": "sentinel-0:26379, sentinel-1:26380",
    "REDIS_MASTER_NAME": "transvidio",
    "REDIS_USER": "app",
    "MPI_MASTER_HOST": "mpi-master",
    "OUTPUTS_DIR": "/srv/transvidio/outputs",
    **{f"{name}_FILE": str(SECRETS_DIR / name.lower()) for name in SECRETS},
}
for _key, _value in ENV.items():  # main.py reads its env contract on import, as in the image
    os.environ.setdefault(_key, _value)

from app import db, main  # noqa: E402
from app.config import REQUIRED, Config, Limits  # noqa: E402
from app.db import DependencyDownError  # noqa: E402
from transvidio_jobs import queue, worker  # noqa: E402

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
ALICE = {"authorization": f"Bearer {TOKENS['alice']}"}
BOB = {"authorization": f"Bearer {TOKENS['bob']}"}


# --- fakes --------------------------------------------------------------------------------


class FakeCursor:
    """The statements main.py sends, answered from one table of jobs."""

    def __init__(self, jobs: dict[str, dict[str, Any]], statements: list[tuple[str, Any]]) -> None:
        self.jobs, self.statements = jobs, statements
        self.row: dict[str, Any] | None = None

    async def execute(self, sql: str, params: tuple[Any, ...]) -> None:
        self.statements.append((sql, params))
        if sql == queue.INSERT_SQL:
            job_id, owner, upload_id, duration, language, runner = params
            self.row = self.jobs[job_id] = {
                "id": uuid.UUID(job_id),
                "owner": owner,
                "upload_id": upload_id,
                "duration_seconds": duration,
                "target_language": language,
                "runner": runner,
                "status": "queued",
                "attempts": 0,
                "completions": 0,
                "result_path": None,
                "error": None,
                "created_at": NOW,
                "updated_at": NOW,
            }
        elif sql == queue.ACTIVE_JOBS_SQL:
            active = [j for j in self.jobs.values() if j["owner"] == params[0] and j["status"] in ("queued", "running")]
            self.row = {"count": len(active)}
        elif sql == queue.OWNER_LOCK_SQL:
            self.row = None
        else:
            self.row = self.jobs.get(params[0])

    async def fetchone(self) -> Any:
        return self.row


class FakeConnection:
    def __init__(self, jobs: dict[str, dict[str, Any]], statements: list[tuple[str, Any]]) -> None:
        self.jobs, self.statements = jobs, statements

    def cursor(self, row_factory: Any = None) -> FakeCursor:
        return FakeCursor(self.jobs, self.statements)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        self.statements.append(("BEGIN", ()))
        yield
        self.statements.append(("COMMIT", ()))


class FakeDatabase:
    """Writes and reads on one table of jobs; `down` makes every call a DependencyDownError."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.statements: list[tuple[str, Any]] = []
        self.down: str | None = None
        self.lagging: set[str] = set()
        self._abandoned: set[Any] = set()

    # The real bound on probes (given up on, never cancelled).
    within = db.Database.within
    _forget = db.Database._forget

    async def write(self, work: Any) -> Any:
        if self.down:
            raise DependencyDownError("postgres-primary", self.down)
        return await work(FakeConnection(self.jobs, self.statements))

    async def read(self, work: Any) -> Any:
        if self.down:
            raise DependencyDownError("postgres-primary", self.down)
        return await work(FakeConnection(self.jobs, self.statements))


class FakeCache:
    def __init__(self) -> None:
        self.documents: dict[str, dict[str, Any]] = {}

    async def get_job(self, job_id: str) -> dict[str, Any] | None:
        return self.documents.get(job_id)

    async def put_job(self, job_id: str, document: dict[str, Any]) -> None:
        self.documents[job_id] = document


class FakeState:
    def __init__(self) -> None:
        self.db = FakeDatabase()
        self.cache = FakeCache()
        self.health_lock = __import__("asyncio").Lock()
        self.health: tuple[int, dict[str, Any]] = (503, {})
        self.health_at = -main.HEALTH_CACHE_SECONDS


LIMITS = Limits(
    max_upload_bytes=1000,
    max_json_bytes=200,
    max_job_seconds=36000,
    max_active_jobs_per_token=3,
    min_free_disk_bytes=0,
    upload_retention_hours=2,
    output_retention_hours=5,
)


def configure(monkeypatch: pytest.MonkeyPatch, uploads: pathlib.Path, outputs: pathlib.Path, **limits: int) -> None:
    config = Config.from_env({**ENV, "UPLOADS_DIR": str(uploads), "OUTPUTS_DIR": str(outputs)})
    monkeypatch.setattr(main, "config", dataclasses.replace(config, limits=dataclasses.replace(LIMITS, **limits)))


@pytest.fixture
def outputs(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture
def state(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, outputs: pathlib.Path) -> Iterator[FakeState]:
    fake = FakeState()
    configure(monkeypatch, tmp_path, outputs)
    monkeypatch.setattr(main, "_state", fake)
    yield fake


# --- an ASGI client -------------------------------------------------------------------------


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    method: str,
    path: str,
    body: Iterable[bytes] = (),
    headers: dict[str, str] | None = None,
    token: dict[str, str] | None = None,
) -> Response:
    """One request through the whole app (routing, middleware, exception handlers), as
    alice unless another `token` (or {} for none) is given."""
    chunks = list(body)
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    messages = messages or [{"type": "http.request", "body": b"", "more_body": False}]
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    path, _, query = path.partition("?")
    all_headers = {**(ALICE if token is None else token), **(headers or {})}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in all_headers.items()],
        "client": ("192.0.2.1", 40000),
        "server": ("backend", 8000),
    }
    run(main.app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    response_headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return Response(start["status"], response_headers, b"".join(m.get("body", b"") for m in sent[1:]))


def upload(data: bytes, token: dict[str, str] | None = None) -> str:
    response = call("POST", "/api/uploads", [data], token=token)
    assert response.status == 201, response.body
    return str(response.json()["upload_id"])


def post_job(body: Any, token: dict[str, str] | None = None) -> Response:
    return call("POST", "/api/jobs", [json.dumps(body).encode()], token=token)


def new_job(duration: int = 5, token: dict[str, str] | None = None) -> str:
    upload_id = upload(b"video", token)
    response = post_job({"upload_id": upload_id, "duration_seconds": duration, "target_language": "fr"}, token)
    assert response.status == 201, response.body
    return str(response.json()["id"])


# --- liveness and the served-by header ------------------------------------------------------------


def test_liveness_names_the_backend_and_every_response_carries_x_served_by(state: FakeState) -> None:
    response = call("GET", "/health", token={})
    assert (response.status, response.json()) == (200, {"status": "ok", "backend": main.HOST})
    assert response.headers["x-served-by"] == main.HOST
    assert response.headers["content-type"] == "application/json"  # the app's own headers kept
    assert call("GET", "/api/jobs/not-a-uuid").headers["x-served-by"] == main.HOST


# --- authentication -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/health"),
        ("POST", "/api/uploads"),
        ("POST", "/api/jobs"),
        ("GET", f"/api/jobs/{uuid.UUID(int=1)}"),
        ("GET", f"/api/jobs/{uuid.UUID(int=1)}/result"),
    ],
)
def test_every_api_route_without_a_token_is_a_401_with_a_bearer_challenge(
    state: FakeState, tmp_path: pathlib.Path, method: str, path: str
) -> None:
    response = call(method, path, [b"x"], token={})
    assert (response.status, response.json()) == (
        401,
        {"error": "a bearer token is required: Authorization: Bearer <token>"},
    )
    assert response.headers["www-authenticate"] == 'Bearer realm="transvidio"'
    for wrong in ({"authorization": "Bearer not-a-token"}, {"authorization": TOKENS["alice"]}):
        response = call(method, path, [b"x"], token=wrong)
        assert response.status == 401, wrong
    assert call(method, path, [b"x"], token={"authorization": "Bearer not-a-token"}).json() == {
        "error": "the bearer token is not valid"
    }
    assert (
        call(method, path, token={"authorization": "Bearer x"}).headers["www-authenticate"]
        == 'Bearer realm="transvidio", error="invalid_token"'
    )
    assert list(tmp_path.iterdir()) == [] and state.db.statements == []


@pytest.mark.parametrize("header", [f"Basic {TOKENS['alice']}", "Bearer ", "Bearer    ", TOKENS["alice"]])
def test_another_scheme_or_an_empty_bearer_token_is_told_a_bearer_token_is_required(
    state: FakeState, header: str
) -> None:
    response = call("POST", "/api/uploads", [b"v"], token={"authorization": header})
    assert (response.status, response.json()) == (
        401,
        {"error": "a bearer token is required: Authorization: Bearer <token>"},
    )


def test_the_scheme_is_case_insensitive_and_each_configured_token_is_its_own_owner(state: FakeState) -> None:
    assert call("POST", "/api/uploads", [b"v"], token={"authorization": f"bearer {TOKENS['bob']}"}).status == 201
    assert main.config.token_digests == {
        hashlib.sha256(token.encode()).hexdigest(): name for name, token in TOKENS.items()
    }


# --- uploads ----------------------------------------------------------------------------------------


def test_an_upload_is_streamed_to_its_owners_directory_under_a_fresh_id(
    state: FakeState, tmp_path: pathlib.Path
) -> None:
    response = call("POST", "/api/uploads", [b"abc", b"def", b"g"])
    assert response.status == 201
    upload_id = response.json()["upload_id"]
    assert response.json() == {"upload_id": upload_id, "size": 7}
    assert len(upload_id) == 32 and int(upload_id, 16) >= 0
    assert (tmp_path / "alice" / upload_id).read_bytes() == b"abcdefg"
    assert sorted(p.name for p in (tmp_path / "alice").iterdir()) == [upload_id]  # no .part left
    assert upload(b"x") != upload_id
    bobs = upload(b"y", BOB)
    assert (tmp_path / "bob" / bobs).read_bytes() == b"y"


def test_an_upload_declared_over_the_limit_is_refused_before_reading_it(
    state: FakeState, tmp_path: pathlib.Path
) -> None:
    response = call("POST", "/api/uploads", [b"x" * 10], headers={"content-length": "1001"})
    assert response.status == 413
    assert response.json() == {"error": "upload of 1001 bytes exceeds the limit of 1000 bytes"}
    assert list(tmp_path.rglob("*")) == []


def test_an_upload_exactly_at_the_limit_is_accepted(state: FakeState, tmp_path: pathlib.Path) -> None:
    response = call("POST", "/api/uploads", [b"x" * 1000], headers={"content-length": "1000"})
    assert (response.status, response.json()["size"]) == (201, 1000)


def test_an_upload_that_grows_past_the_limit_is_refused_and_its_partial_file_removed(
    state: FakeState, tmp_path: pathlib.Path
) -> None:
    response = call("POST", "/api/uploads", [b"x" * 600, b"x" * 401])  # chunked: no length declared
    assert response.status == 413
    assert response.json() == {"error": "upload exceeds the limit of 1000 bytes"}
    assert list((tmp_path / "alice").iterdir()) == []


def test_a_malformed_content_length_and_an_empty_upload_are_400s(state: FakeState, tmp_path: pathlib.Path) -> None:
    response = call("POST", "/api/uploads", [b"abc"], headers={"content-length": "3x"})
    assert (response.status, response.json()) == (400, {"error": "Content-Length must be a number"})
    response = call("POST", "/api/uploads", [b""])
    assert (response.status, response.json()) == (400, {"error": "empty upload"})
    assert list((tmp_path / "alice").iterdir()) == []


def test_an_upload_interrupted_by_an_error_leaves_no_partial_file(
    state: FakeState, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_stream(self: Any) -> Any:
        yield b"some bytes"
        raise ConnectionResetError("client went away")

    monkeypatch.setattr(Request, "stream", broken_stream)
    with pytest.raises(ConnectionResetError):
        call("POST", "/api/uploads", [b"ignored"])
    assert list((tmp_path / "alice").iterdir()) == []


class Clock:
    """The `time` main.py sees (the event loop keeps the real one): monotonic readings each
    `step` seconds after the last, and the wall clock as given."""

    def __init__(self, step: float = 0.0, wall: float | None = None) -> None:
        self.now, self.step, self.wall = 1000.0, step, wall

    def monotonic(self) -> float:
        self.now += self.step
        return self.now

    def time(self) -> float:
        return time.time() if self.wall is None else self.wall


def test_a_body_that_trickles_is_cut_off_with_a_408_after_the_grace_period(
    state: FakeState, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each chunk arrives 3 s after the last: 1 byte each is far below 1 KB a second.
    monkeypatch.setattr(main, "time", Clock(3.0))
    response = call("POST", "/api/uploads", [b"x"] * 10)
    assert response.status == 408
    assert response.json() == {"error": "upload too slow: 4 bytes in 12 s (at least 1024 bytes a second after 10 s)"}
    assert list((tmp_path / "alice").iterdir()) == []
    upload_id = upload(b"video")
    body = json.dumps({"upload_id": upload_id, "duration_seconds": 5, "target_language": "fr"}).encode()
    response = call("POST", "/api/jobs", [bytes([b]) for b in body])
    assert response.status == 408 and response.json()["error"].startswith("body too slow: 4 bytes in 12 s")
    # Just below the rate is too slow as well: 2000 bytes every 3 s is 667 bytes a second.
    configure(monkeypatch, tmp_path, tmp_path, max_upload_bytes=10**6)
    response = call("POST", "/api/uploads", [b"x" * 2000] * 10)
    assert (response.status, response.json()["error"]) == (
        408,
        "upload too slow: 8000 bytes in 12 s (at least 1024 bytes a second after 10 s)",
    )


def test_a_fast_enough_body_is_never_cut_off_however_long_it_takes(
    state: FakeState, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, tmp_path, tmp_path, max_upload_bytes=10**6)
    monkeypatch.setattr(main, "time", Clock(3.0))  # 4 KB every 3 s, for a minute
    response = call("POST", "/api/uploads", [b"x" * 4096] * 20)
    assert (response.status, response.json()["size"]) == (201, 20 * 4096)


def test_an_upload_that_would_leave_too_little_disk_free_is_a_507(
    state: FakeState, tmp_path: pathlib.Path, outputs: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, tmp_path, outputs, min_free_disk_bytes=5000)
    free = {"bytes": 5100}
    monkeypatch.setattr(main, "free_disk_bytes", lambda path: free["bytes"])
    response = call("POST", "/api/uploads", [b"x" * 200], headers={"content-length": "200"})
    assert (response.status, response.json()) == (
        507,
        {"error": "not enough free space for this upload: 5100 bytes free, 5000 must stay free (minFreeDisk)"},
    )
    assert call("POST", "/api/uploads", [b"x" * 100], headers={"content-length": "100"}).status == 201
    free["bytes"] = 4999  # a chunked upload, with no length to check first
    assert call("POST", "/api/uploads", [b"x"]).status == 507


def test_a_chunked_upload_is_stopped_when_the_disk_fills_while_it_streams(
    state: FakeState, tmp_path: pathlib.Path, outputs: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, tmp_path, outputs, max_upload_bytes=10**8, min_free_disk_bytes=1)
    monkeypatch.setattr(main, "FREE_DISK_CHECK_BYTES", 1000)
    readings = iter([10**9, 10**9, 0])  # before the upload, after 1000 bytes, after 2000
    monkeypatch.setattr(main, "free_disk_bytes", lambda path: next(readings))
    response = call("POST", "/api/uploads", [b"x" * 500] * 6)
    assert response.status == 507
    assert list((tmp_path / "alice").iterdir()) == []


# --- jobs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([], "the body must be a JSON object"),
        ({"upload_id": "a", "zeta": 1, "alpha": 2}, "unknown field(s): alpha, zeta"),
        ({"duration_seconds": 5, "target_language": "fr"}, "upload_id must be the id returned by POST /api/uploads"),
        ({"upload_id": "A" * 32}, "upload_id must be the id returned by POST /api/uploads"),
        ({"upload_id": "0" * 31}, "upload_id must be the id returned by POST /api/uploads"),
        ({"upload_id": "0" * 32 + "\n"}, "upload_id must be the id returned by POST /api/uploads"),
    ],
)
def test_a_job_body_of_the_wrong_shape_is_a_422_with_the_reason(state: FakeState, body: Any, reason: str) -> None:
    response = post_job(body)
    assert (response.status, response.json()) == (422, {"error": reason})
    assert state.db.statements == []


@pytest.mark.parametrize("duration", [0, 36001, True, 2.5, "10", None])
def test_a_duration_out_of_range_or_not_a_whole_number_is_a_422(state: FakeState, duration: Any) -> None:
    upload_id = upload(b"video")
    response = post_job({"upload_id": upload_id, "duration_seconds": duration, "target_language": "fr"})
    assert (response.status, response.json()) == (
        422,
        {"error": "duration_seconds must be a whole number from 1 to 36000"},
    )


def test_the_longest_job_is_the_stacks_setting(
    state: FakeState, tmp_path: pathlib.Path, outputs: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, tmp_path, outputs, max_job_seconds=90)
    upload_id = upload(b"video")
    response = post_job({"upload_id": upload_id, "duration_seconds": 91, "target_language": "fr"})
    assert response.json() == {"error": "duration_seconds must be a whole number from 1 to 90"}
    assert post_job({"upload_id": upload_id, "duration_seconds": 90, "target_language": "fr"}).status == 201


@pytest.mark.parametrize("language", ["", "f", "french", "FR", "pt-", "pt-B", "pt-BRAZILIAN", "fr\n", 7])
def test_a_target_language_that_is_not_a_language_tag_is_a_422(state: FakeState, language: Any) -> None:
    upload_id = upload(b"video")
    response = post_job({"upload_id": upload_id, "duration_seconds": 5, "target_language": language})
    assert (response.status, response.json()) == (
        422,
        {"error": "target_language must be a language tag such as 'fr' or 'pt-BR'"},
    )


def test_a_job_for_an_upload_that_does_not_exist_or_is_another_tokens_is_a_422_naming_it(state: FakeState) -> None:
    missing = "f" * 32
    response = post_job({"upload_id": missing, "duration_seconds": 5, "target_language": "fr"})
    assert (response.status, response.json()) == (422, {"error": f"upload {missing} does not exist"})
    bobs = upload(b"bob's video", BOB)
    response = post_job({"upload_id": bobs, "duration_seconds": 5, "target_language": "fr"})
    assert (response.status, response.json()) == (422, {"error": f"upload {bobs} does not exist"})
    assert post_job({"upload_id": bobs, "duration_seconds": 5, "target_language": "fr"}, BOB).status == 201


def test_a_job_body_over_the_json_limit_is_a_413_without_being_held(state: FakeState) -> None:
    upload_id = upload(b"video")
    padded = json.dumps({"upload_id": upload_id, "duration_seconds": 5, "target_language": "fr", "pad": "x" * 200})
    response = call("POST", "/api/jobs", [padded.encode()], headers={"content-length": str(len(padded))})
    assert (response.status, response.json()) == (
        413,
        {"error": f"body of {len(padded)} bytes exceeds the limit of 200 bytes"},
    )
    response = call("POST", "/api/jobs", [b"{" + b" " * 150, b" " * 51 + b"}"])  # chunked, no length declared
    assert (response.status, response.json()) == (413, {"error": "body exceeds the limit of 200 bytes"})
    assert state.db.statements == []
    exact = json.dumps({"upload_id": upload_id, "duration_seconds": 5, "target_language": "fr"}).encode()
    exact += b" " * (200 - len(exact))
    assert call("POST", "/api/jobs", [exact], headers={"content-length": "200"}).status == 201


def test_malformed_json_is_a_400(state: FakeState) -> None:
    response = call("POST", "/api/jobs", [b"{not json"])
    assert response.status == 400
    assert response.json()["error"].startswith("malformed JSON: Expecting property name")
    assert call("POST", "/api/jobs", [b"\xff\xfe"]).status == 400


@pytest.mark.parametrize(("duration", "runner"), [(1, "backend"), (60, "backend"), (61, "mpi"), (36000, "mpi")])
def test_jobs_longer_than_60_seconds_go_to_the_mpi_cluster_and_the_rest_to_a_backend(
    state: FakeState, duration: int, runner: str
) -> None:
    upload_id = upload(b"video")
    response = post_job({"upload_id": upload_id, "duration_seconds": duration, "target_language": "pt-BR"})
    assert response.status == 201
    document = response.json()
    # Counted and inserted in one transaction, under the owner's lock.
    assert [sql for sql, _ in state.db.statements] == [
        "BEGIN",
        queue.OWNER_LOCK_SQL,
        queue.ACTIVE_JOBS_SQL,
        queue.INSERT_SQL,
        "COMMIT",
    ]
    assert state.db.statements[1][1] == (queue.OWNER_LOCK_SPACE, "alice")
    assert state.db.statements[2][1] == ("alice",)
    params = state.db.statements[3][1]
    assert params[1:] == ("alice", upload_id, duration, "pt-BR", runner)
    assert document == {
        "id": params[0],
        "owner": "alice",
        "status": "queued",
        "runner": runner,
        "upload_id": upload_id,
        "duration_seconds": duration,
        "target_language": "pt-BR",
        "attempts": 0,
        "completions": 0,
        "error": None,
        "created_at": NOW.isoformat(),
        "updated_at": NOW.isoformat(),
    }


def test_a_token_with_its_limit_of_active_jobs_gets_a_429_and_others_are_not_affected(state: FakeState) -> None:
    first = [new_job() for _ in range(3)]
    upload_id = upload(b"video")
    response = post_job({"upload_id": upload_id, "duration_seconds": 5, "target_language": "fr"})
    assert (response.status, response.json()) == (
        429,
        {"error": "token alice already has 3 jobs queued or running (maxActiveJobsPerToken)"},
    )
    assert len(state.db.jobs) == 3
    new_job(token=BOB)  # another token's count is its own
    state.db.jobs[first[0]]["status"] = "succeeded"  # a finished job no longer counts
    assert post_job({"upload_id": upload_id, "duration_seconds": 5, "target_language": "fr"}).status == 201


def test_a_job_is_read_back_and_cached_only_once_it_is_finished(state: FakeState) -> None:
    job_id = new_job()
    response = call("GET", f"/api/jobs/{job_id}")
    assert (response.status, response.json()["status"]) == (200, "queued")
    assert "result_url" not in response.json() and "result_path" not in response.json()
    assert state.cache.documents == {}  # a running job changes: never cached

    state.db.jobs[job_id].update(status="succeeded", result_path=f"{job_id}/result.json", completions=1)
    finished = call("GET", f"/api/jobs/{job_id}").json()
    assert finished["result_url"].startswith(f"/api/jobs/{job_id}/result?expires=")
    assert "result_path" not in finished
    assert state.cache.documents[job_id]["result_path"] == f"{job_id}/result.json"
    assert "result_url" not in state.cache.documents[job_id]  # a signed link is made per answer

    state.db.down = "must not be asked"  # a cached document is served without PostgreSQL
    again = call("GET", f"/api/jobs/{job_id}").json()
    assert {k: v for k, v in again.items() if k != "result_url"} == {
        k: v for k, v in finished.items() if k != "result_url"
    }
    assert call("GET", f"/api/jobs/{job_id.upper()}").status == 200  # the id is normalised


def test_a_failed_job_is_cached_too(state: FakeState) -> None:
    job_id = new_job()
    state.db.jobs[job_id].update(status="failed", error="boom")
    assert call("GET", f"/api/jobs/{job_id}").json()["error"] == "boom"
    assert list(state.cache.documents) == [job_id]


def test_another_tokens_job_is_a_404_from_the_database_and_from_the_cache(state: FakeState) -> None:
    job_id = new_job()
    response = call("GET", f"/api/jobs/{job_id}", token=BOB)
    assert (response.status, response.json()) == (404, {"error": f"no job {job_id}"})
    state.db.jobs[job_id].update(status="failed", error="boom")
    assert call("GET", f"/api/jobs/{job_id}").status == 200  # alice's read caches it
    assert job_id in state.cache.documents
    assert call("GET", f"/api/jobs/{job_id}", token=BOB).status == 404
    assert call("GET", f"/api/jobs/{job_id}/result", token=BOB).status == 404


def test_an_unknown_or_malformed_job_id_is_a_404_naming_it(state: FakeState) -> None:
    unknown = str(uuid.UUID(int=7))
    response = call("GET", f"/api/jobs/{unknown}")
    assert (response.status, response.json()) == (404, {"error": f"no job {unknown}"})
    response = call("GET", "/api/jobs/nope")
    assert (response.status, response.json()) == (404, {"error": "no job nope"})
    assert [params for _, params in state.db.statements] == [(unknown,)]  # the malformed id never reached SQL


def test_a_database_that_is_down_is_a_503_naming_it_and_nothing_of_the_error(
    state: FakeState, caplog: pytest.LogCaptureFixture
) -> None:
    upload_id = upload(b"video")
    state.db.down = 'connection to server at "10.211.1.10", port 5432 failed'
    response = post_job({"upload_id": upload_id, "duration_seconds": 5, "target_language": "fr"})
    assert (response.status, response.json()) == (503, {"error": "postgres-primary unavailable"})
    assert call("GET", f"/api/jobs/{uuid.UUID(int=1)}").status == 503
    assert "10.211.1.10" in caplog.text  # the detail is for the log


# --- results ----------------------------------------------------------------------------------------


def finished_job(state: FakeState, outputs: pathlib.Path) -> str:
    job_id = new_job()
    (outputs / job_id).mkdir()
    (outputs / job_id / "result.json").write_text("{}")
    state.db.jobs[job_id].update(status="succeeded", result_path=f"{job_id}/result.json", completions=1)
    return job_id


def test_a_result_is_sent_by_nginx_from_its_internal_location_to_the_token_that_owns_it(
    state: FakeState, outputs: pathlib.Path
) -> None:
    job_id = finished_job(state, outputs)
    response = call("GET", f"/api/jobs/{job_id}/result")
    assert response.status == 200
    assert response.headers["x-accel-redirect"] == f"/_outputs/{job_id}/result.json"
    assert response.headers["content-type"] == "application/json"
    assert response.body == b""
    assert call("GET", f"/api/jobs/{job_id}/result", token={}).status == 401


def test_a_signed_link_serves_the_result_without_the_token_until_it_expires(
    state: FakeState, outputs: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = finished_job(state, outputs)
    link = call("GET", f"/api/jobs/{job_id}").json()["result_url"]
    expires = int(link.split("expires=")[1].split("&")[0])
    assert abs(expires - (time.time() + main.RESULT_LINK_SECONDS)) < 5
    response = call("GET", link, token={})
    assert (response.status, response.headers["x-accel-redirect"]) == (200, f"/_outputs/{job_id}/result.json")
    refused = {"error": "the result link is not valid or has expired: ask GET /api/jobs/{id} for a new one"}
    tampered = [
        link.replace("signature=", "signature=0"),
        link.replace(f"expires={expires}", f"expires={expires + 1}"),
        link.replace(job_id, str(uuid.UUID(int=9))),
        f"/api/jobs/{job_id}/result?expires={expires}",
        f"/api/jobs/{job_id}/result?signature=abc",
    ]
    for bad in tampered:
        response = call("GET", bad, token={})
        assert (response.status, response.json()) == (403, refused), bad
    monkeypatch.setattr(main, "time", Clock(wall=expires))
    assert call("GET", link, token={}).status == 200  # valid through the second it names
    monkeypatch.setattr(main, "time", Clock(wall=expires + 1))
    assert call("GET", link, token={}).status == 403
    # Signed with the stack's secret key: a different key signs differently.
    assert main.link_signature(job_id, expires) == hmac_sha256("secret-key", f"result:{job_id}:{expires}")


def hmac_sha256(key: str, message: str) -> str:
    import hmac

    return hmac.new(key.encode(), message.encode(), hashlib.sha256).hexdigest()


def test_only_a_succeeded_job_with_a_result_path_has_a_result(state: FakeState, outputs: pathlib.Path) -> None:
    no_path = finished_job(state, outputs)
    state.db.jobs[no_path].update(result_path=None)
    response = call("GET", f"/api/jobs/{no_path}/result")
    assert (response.status, response.json()) == (404, {"error": f"job {no_path} has no result (status succeeded)"})
    failed = finished_job(state, outputs)  # a failed retry may leave a file from an earlier attempt
    state.db.jobs[failed].update(status="failed")
    response = call("GET", f"/api/jobs/{failed}/result")
    assert (response.status, response.json()) == (404, {"error": f"job {failed} has no result (status failed)"})


def test_a_result_not_there_yet_is_a_404_and_one_past_retention_a_410(state: FakeState, outputs: pathlib.Path) -> None:
    job_id = new_job()
    response = call("GET", f"/api/jobs/{job_id}/result")
    assert (response.status, response.json()) == (404, {"error": f"job {job_id} has no result (status queued)"})
    done = finished_job(state, outputs)
    (outputs / done / "result.json").unlink()
    response = call("GET", f"/api/jobs/{done}/result")
    assert (response.status, response.json()) == (
        410,
        {"error": f"the result of job {done} has expired (outputRetentionHours)"},
    )


# --- retention ----------------------------------------------------------------------------------


def test_the_sweep_removes_uploads_partial_uploads_and_results_past_their_retention(
    state: FakeState, tmp_path: pathlib.Path, outputs: pathlib.Path
) -> None:
    now = time.time()
    hour = 3600

    def aged(path: pathlib.Path, hours: float, directory: bool = False) -> pathlib.Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            path.mkdir()
            (path / "result.json").write_text("{}")
        else:
            path.write_bytes(b"x")
        os.utime(path, (now - hours * hour, now - hours * hour))
        return path

    old_upload = aged(tmp_path / "alice" / ("a" * 32), 2.1)  # retention: 2 hours
    kept_upload = aged(tmp_path / "bob" / ("b" * 32), 1.9)
    dead_partial = aged(tmp_path / "alice" / ("c" * 32 + ".part"), 1.1)  # a partial one: 1 hour
    live_partial = aged(tmp_path / "alice" / ("d" * 32 + ".part"), 0.5)
    old_result = aged(outputs / str(uuid.UUID(int=1)), 5.1, directory=True)  # results: 5 hours
    kept_result = aged(outputs / str(uuid.UUID(int=2)), 4.9, directory=True)
    removed = main.sweep(str(tmp_path), str(outputs), now)
    assert sorted(removed) == sorted(str(p) for p in (old_upload, dead_partial, old_result))
    assert [p.exists() for p in (kept_upload, live_partial, kept_result)] == [True, True, True]
    assert main.sweep(str(tmp_path), str(outputs), now) == []


def test_the_sweep_keeps_what_is_exactly_at_its_retention_and_removes_what_is_a_second_older(
    state: FakeState, tmp_path: pathlib.Path, outputs: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = 10_000_000  # whole seconds: the boundary is exact
    ages = {"upload": 2 * 3600, "partial": main.PARTIAL_UPLOAD_SECONDS, "result": 5 * 3600}
    paths: dict[tuple[str, int], pathlib.Path] = {}
    for kind, age in ages.items():
        for extra in (0, 1):
            if kind == "result":
                path = outputs / str(uuid.uuid4())
                path.mkdir()
            else:
                path = tmp_path / "alice" / (uuid.uuid4().hex + (".part" if kind == "partial" else ""))
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(b"x")
            os.utime(path, (now - age - extra, now - age - extra))
            paths[kind, extra] = path
    # Stray files beside the owners' directories come first and are passed over.
    for stray in range(3):
        (tmp_path / f"stray-{stray}").write_bytes(b"x")
    scandir = os.scandir

    class FilesFirst(list[os.DirEntry[str]]):  # usable as os.scandir's result is, shutil.rmtree's way too
        def __enter__(self) -> FilesFirst:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(os, "scandir", lambda path: FilesFirst(sorted(scandir(path), key=lambda e: e.is_dir())))
    removed = main.sweep(str(tmp_path), str(outputs), now)
    assert sorted(removed) == sorted(str(paths[kind, 1]) for kind in ages)
    assert all(paths[kind, 0].exists() for kind in ages)


def test_the_sweep_never_follows_a_symbolic_link_out_of_the_volume(
    state: FakeState, tmp_path: pathlib.Path, outputs: pathlib.Path
) -> None:
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    precious = elsewhere / "precious"
    precious.write_text("keep")
    os.utime(precious, (1, 1))
    (tmp_path / "mallory").symlink_to(elsewhere)
    (outputs / str(uuid.UUID(int=3))).symlink_to(elsewhere)
    os.utime(outputs / str(uuid.UUID(int=3)), (1, 1), follow_symlinks=False)  # the link itself is old too
    os.utime(elsewhere, (1, 1))
    assert main.sweep(str(tmp_path), str(outputs), time.time()) == []
    assert precious.read_text() == "keep"


# --- readiness ------------------------------------------------------------------------------------


def test_readiness_is_503_listing_exactly_the_dependencies_that_are_down(
    state: FakeState, monkeypatch: pytest.MonkeyPatch
) -> None:
    probed: list[tuple[str, bool]] = []

    async def postgres(host: str, writable: bool = False) -> dict[str, Any]:
        probed.append((host, writable))
        if host == "postgres-replica-2":
            raise OSError("no route to host")
        return {"ok": True, "role": "replica"}

    async def healthy() -> dict[str, Any]:
        return {"ok": True}

    async def not_ssh() -> dict[str, Any]:
        return {"ok": False}

    monkeypatch.setattr(main, "_postgres", postgres)
    monkeypatch.setattr(main, "_redis", healthy)
    monkeypatch.setattr(main, "_mpi", not_ssh)
    response = call("GET", "/api/health")
    body = response.json()
    assert response.status == 503
    assert (body["status"], body["down"], body["backend"]) == (
        "degraded",
        ["mpi-master", "postgres:postgres-replica-2"],
        main.HOST,
    )
    # The primary through the whole host list, then each node on its own.
    assert sorted(probed) == [
        ("postgres-primary", False),
        ("postgres-primary,postgres-replica-1,postgres-replica-2", True),
        ("postgres-replica-1", False),
        ("postgres-replica-2", False),
    ]
    assert body["dependencies"]["postgres:postgres-replica-2"] == {"ok": False, "error": "OSError"}
    assert sorted(body["dependencies"]) == [
        "mpi-master",
        "postgres-primary",
        "postgres:postgres-primary",
        "postgres:postgres-replica-1",
        "postgres:postgres-replica-2",
        "redis",
    ]


class FakePgConnection:
    """What `_postgres` sees of a node: its answer to pg_is_in_recovery(), and its name."""

    def __init__(self, in_recovery: bool, host: str) -> None:
        self.in_recovery, self.sql = in_recovery, ""
        self.info = types.SimpleNamespace(host=host)

    async def __aenter__(self) -> FakePgConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def execute(self, sql: str) -> FakePgConnection:
        self.sql = sql
        return self

    async def fetchone(self) -> tuple[bool]:
        return (self.in_recovery,)


@pytest.mark.parametrize(
    ("host", "writable", "in_recovery", "expected"),
    [
        # Through the host list: ready when the node libpq found is primary, and named.
        ("a,b", True, False, {"ok": True, "role": "primary", "node": "b"}),
        ("a,b", True, True, {"ok": False, "role": "replica", "node": "b"}),
        # One node: a primary is ready; a replica while it does not lag.
        ("postgres-replica-1", False, False, {"ok": True, "role": "primary"}),
        ("postgres-replica-1", False, True, {"ok": True, "role": "replica", "lagging": False}),
        ("postgres-replica-2", False, True, {"ok": False, "role": "replica", "lagging": True}),
    ],
)
def test_a_postgres_node_is_ready_as_primary_or_as_a_replica_that_keeps_up(
    state: FakeState,
    monkeypatch: pytest.MonkeyPatch,
    host: str,
    writable: bool,
    in_recovery: bool,
    expected: dict[str, Any],
) -> None:
    connections: list[dict[str, Any]] = []

    async def connect(conninfo: str = "", **kwargs: Any) -> FakePgConnection:
        connections.append({**conninfo_to_dict(conninfo), **kwargs})
        return FakePgConnection(in_recovery, host.split(",")[-1])

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", connect)
    state.db.lagging = {"postgres-replica-2"}
    # The replicas' probes leave `writable` to its default, as readiness calls them.
    status = run(main._postgres(host, writable=True) if writable else main._postgres(host))
    latency = status.pop("latency_ms")
    assert status == expected
    assert isinstance(latency, float) and 0 <= latency < 1000
    config = main.config
    assert connections == [
        {
            "host": host,
            "port": config.postgres_port,
            "dbname": config.postgres_db,
            "user": config.postgres_user,
            "password": config.postgres_password,
            "connect_timeout": 2,
            "target_session_attrs": "read-write" if writable else "any",
            "autocommit": True,
            # A node that stops answering fails the probe within seconds (it is never cancelled).
            **worker.CONNECTION_TIMEOUTS,
        }
    ]


def test_redis_is_ready_when_the_sentinels_name_a_master_that_answers(
    state: FakeState, monkeypatch: pytest.MonkeyPatch
) -> None:
    pinged: list[bool] = []

    class Sentinel:
        async def discover_master(self, name: str) -> tuple[str, int]:
            assert name == main.config.redis_master_name
            return "10.211.1.21", 6379

    class Master:
        async def ping(self) -> bool:
            pinged.append(True)
            return True

    state.cache.sentinel = Sentinel()  # type: ignore[attr-defined]
    state.cache.master = Master()  # type: ignore[attr-defined]
    assert run(main._redis()) == {"ok": True, "master": "10.211.1.21:6379"}
    assert pinged == [True]


@pytest.mark.parametrize(("banner", "ok"), [(b"SSH-2.0-OpenSSH_10.0\r\n", True), (b"HTTP/1.1 400 Bad\r\n", False)])
def test_the_mpi_master_is_ready_when_its_port_22_speaks_ssh(
    state: FakeState, monkeypatch: pytest.MonkeyPatch, banner: bytes, ok: bool
) -> None:
    import asyncio

    dialled: list[tuple[str, int]] = []
    real_open_connection = asyncio.open_connection

    async def scenario() -> dict[str, Any]:
        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(banner)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(greet, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def open_connection(host: str, wanted_port: int) -> Any:
            dialled.append((host, wanted_port))  # the stack's sshd; here a local stand-in
            return await real_open_connection("127.0.0.1", port)

        monkeypatch.setattr(asyncio, "open_connection", open_connection)
        async with server:
            return await main._mpi()

    assert run(scenario()) == {"ok": ok}
    assert dialled == [("mpi-master", 22)]


def test_readiness_is_200_when_every_dependency_is_up(state: FakeState, monkeypatch: pytest.MonkeyPatch) -> None:
    async def healthy(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"ok": True}

    for probe in ("_postgres", "_redis", "_mpi"):
        monkeypatch.setattr(main, probe, healthy)
    response = call("GET", "/api/health")
    assert (response.status, response.json()["status"], response.json()["down"]) == (200, "ok", [])


def test_a_probe_that_hangs_is_reported_down_after_the_dependency_timeout_and_a_postgres_one_is_not_cancelled(
    state: FakeState, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    monkeypatch.setattr(main, "config", Config.from_env({**ENV, "DEPENDENCY_TIMEOUT_SECONDS": "0.05"}))
    probes: dict[str, asyncio.Task[Any]] = {}
    released = asyncio.Event()

    def hanging(kind: str) -> Any:
        async def hang(*args: Any, **kwargs: Any) -> dict[str, Any]:
            probes[kind] = asyncio.current_task()  # type: ignore[assignment]
            await released.wait()
            return {"ok": True}

        return hang

    for probe in ("_postgres", "_redis", "_mpi"):
        monkeypatch.setattr(main, probe, hanging(probe))

    async def round_of_probes() -> tuple[int, dict[str, Any], dict[str, bool]]:
        status, body = await main.readiness()
        await asyncio.sleep(0)  # let cancellations land
        # psycopg's cancel of a query on a node that does not answer blocks the event loop
        # (Database.within): a PostgreSQL probe given up on runs on; the others are cancelled.
        cancelled = {kind: task.cancelled() for kind, task in probes.items()}
        released.set()
        await asyncio.sleep(0.01)
        return status, body, cancelled

    status, body, cancelled = run(round_of_probes())
    assert status == 503 and body["down"] == sorted(body["dependencies"])
    assert {result["error"] for result in body["dependencies"].values()} == {"TimeoutError"}
    assert cancelled == {"_postgres": False, "_redis": True, "_mpi": True}
    assert state.db._abandoned == set()  # ended by itself, then let go


def test_a_probes_error_text_goes_to_the_log_and_only_its_kind_to_the_caller(
    state: FakeState, caplog: pytest.LogCaptureFixture
) -> None:
    async def verbose() -> dict[str, Any]:
        raise RuntimeError("connection to 10.211.1.20:6379 refused")

    _, result = run(main._check("redis", verbose()))
    assert result == {"ok": False, "error": "RuntimeError"}
    assert "readiness: redis is down: RuntimeError: connection to 10.211.1.20:6379 refused" in caplog.text


def test_readiness_calls_within_a_second_share_one_round_of_probes(
    state: FakeState, monkeypatch: pytest.MonkeyPatch
) -> None:
    rounds: list[float] = []

    async def counted() -> tuple[int, dict[str, Any]]:
        rounds.append(clock.monotonic())
        return 200, {"status": "ok", "round": len(rounds)}

    clock = Clock()
    monkeypatch.setattr(main, "time", clock)
    monkeypatch.setattr(main, "readiness", counted)
    assert [call("GET", "/api/health").json()["round"] for _ in range(20)] == [1] * 20
    clock.now += main.HEALTH_CACHE_SECONDS - 0.01
    assert call("GET", "/api/health").json()["round"] == 1
    clock.now += 0.02
    assert call("GET", "/api/health").json()["round"] == 2
    assert len(rounds) == 2


# --- the env contract -------------------------------------------------------------------------------


def test_the_env_contract_is_parsed_with_its_defaults() -> None:
    config = Config.from_env(ENV)
    assert config == Config(
        postgres_master_host="postgres-primary,postgres-replica-1,postgres-replica-2",
        postgres_slave_hosts=("postgres-primary", "postgres-replica-1", "postgres-replica-2"),
        postgres_port=5432,
        postgres_db="transvidio",
        postgres_user="transvidio_app",
        postgres_password="app-password",
        redis_sentinels=(("sentinel-0", 26379), ("sentinel-1", 26380)),
        redis_master_name="transvidio",
        redis_user="app",
        redis_password="redis-password",
        mpi_master_host="mpi-master",
        secret_key="secret-key",
        uploads_dir="/srv/transvidio/uploads",
        outputs_dir="/srv/transvidio/outputs",
        outputs_internal_prefix="/_outputs/",
        dependency_timeout=2.0,
        token_digests={hashlib.sha256(token.encode()).hexdigest(): name for name, token in TOKENS.items()},
        limits=Limits(),
    )
    assert Limits() == Limits(500 * 1024 * 1024, 64 * 1024, 36000, 20, 1024**3, 168, 168)
    limited = Config.from_env(
        {
            **ENV,
            "MAX_UPLOAD_BYTES": "1",
            "MAX_JSON_BYTES": "2",
            "MAX_JOB_SECONDS": "3",
            "MAX_ACTIVE_JOBS_PER_TOKEN": "4",
            "MIN_FREE_DISK_BYTES": "5",
            "UPLOAD_RETENTION_HOURS": "6",
            "OUTPUT_RETENTION_HOURS": "7",
        }
    )
    assert limited.limits == Limits(1, 2, 3, 4, 5, 6, 7)
    with pytest.raises(SystemExit) as stopped:
        Config.from_env({**ENV, "MAX_JOB_SECONDS": "10s"})
    assert str(stopped.value) == "backend: MAX_JOB_SECONDS='10s' must be a whole number"
    overridden = Config.from_env(
        {**ENV, "POSTGRES_SLAVE_HOSTS": "", "POSTGRES_PORT": "6543", "DEPENDENCY_TIMEOUT_SECONDS": "0.5"}
    )
    no_replicas = {key: value for key, value in ENV.items() if key != "POSTGRES_SLAVE_HOSTS"}
    assert Config.from_env(no_replicas).postgres_slave_hosts == ()
    assert (overridden.postgres_slave_hosts, overridden.postgres_port, overridden.dependency_timeout) == ((), 6543, 0.5)
    assert Config.from_env({**ENV, "OUTPUTS_INTERNAL_PREFIX": "/_results/"}).outputs_internal_prefix == "/_results/"


def test_a_missing_or_empty_variable_stops_the_backend_naming_every_one() -> None:
    env = {key: value for key, value in ENV.items() if key not in ("POSTGRES_DB", "SECRET_KEY_FILE")}
    with pytest.raises(SystemExit) as stopped:
        Config.from_env({**env, "REDIS_PASSWORD_FILE": ""})
    assert str(stopped.value) == (
        "backend: missing environment variables: POSTGRES_DB, REDIS_PASSWORD_FILE, SECRET_KEY_FILE"
    )
    assert set(REQUIRED) <= set(ENV)


@pytest.mark.parametrize(
    "line", ["alice", "Alice " + "0" * 64, "alice " + "0" * 63, "alice " + "g" * 64, "alice  " + "0" * 64]
)
def test_a_token_file_line_that_is_not_a_name_and_a_digest_stops_the_backend(tmp_path: pathlib.Path, line: str) -> None:
    (tmp_path / "tokens").write_text(f"bob {'1' * 64}\n{line}\n")
    with pytest.raises(SystemExit) as stopped:
        Config.from_env({**ENV, "API_TOKENS_FILE": str(tmp_path / "tokens")})
    assert str(stopped.value) == f"backend: API_TOKENS_FILE={tmp_path / 'tokens'} line 2 is not '<name> <sha256 hex>'"


def test_secrets_are_read_from_their_files_never_from_the_environment(tmp_path: pathlib.Path) -> None:
    # A value in the environment is ignored: only the file counts.
    config = Config.from_env({**ENV, "POSTGRES_PASSWORD": "from-the-environment"})
    assert config.postgres_password == "app-password"
    with pytest.raises(SystemExit) as stopped:
        Config.from_env({**ENV, "REDIS_PASSWORD_FILE": str(tmp_path / "absent")})
    assert (
        str(stopped.value)
        == f"backend: REDIS_PASSWORD_FILE={tmp_path / 'absent'} cannot be read: No such file or directory"
    )
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SystemExit) as stopped:
        Config.from_env({**ENV, "SECRET_KEY_FILE": str(tmp_path / "empty")})
    assert str(stopped.value) == f"backend: SECRET_KEY_FILE={tmp_path / 'empty'} is empty"
