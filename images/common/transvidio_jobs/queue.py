"""Jobs in PostgreSQL: created on the primary, claimed with FOR UPDATE SKIP LOCKED.

A claim is a lease: the runner extends it while it works; a job whose lease expires
(its runner died) is claimed again, up to `max_attempts`. Completion is conditional on
still holding the claim, so a job completes exactly once. Every job belongs to the API
token (its `owner`) that created it.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id uuid PRIMARY KEY,
    upload_id text NOT NULL,
    duration_seconds integer NOT NULL CHECK (duration_seconds > 0),
    target_language text NOT NULL,
    runner text NOT NULL CHECK (runner IN ('backend', 'mpi')),
    status text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    attempts integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL DEFAULT 3,
    claimed_by text,
    lease_until timestamptz,
    completions integer NOT NULL DEFAULT 0,
    result_path text,
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS jobs_claimable ON jobs (runner, status, created_at);
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS owner text NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS jobs_active_by_owner ON jobs (owner) WHERE status IN ('queued', 'running');
"""

COLUMNS = (
    "id, owner, upload_id, duration_seconds, target_language, runner, status, attempts, max_attempts, "
    "claimed_by, completions, result_path, error, created_at, updated_at"
)
SCHEMA_LOCK = 7317001  # advisory lock: backends starting together create the schema once


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        conn.execute(SCHEMA)


class TooManyJobsError(Exception):
    """The owner already has its limit of jobs queued or running."""


# Taken with the owner's name inside the insert's transaction: two requests of one owner
# count and insert one after the other, so the limit is never overshot.
OWNER_LOCK_SQL = "SELECT pg_advisory_xact_lock(%s, hashtext(%s))"
OWNER_LOCK_SPACE = 7317002
ACTIVE_JOBS_SQL = "SELECT count(*) FROM jobs WHERE owner = %s AND status IN ('queued', 'running')"
INSERT_SQL = (
    "INSERT INTO jobs (id, owner, upload_id, duration_seconds, target_language, runner) "
    f"VALUES (%s, %s, %s, %s, %s, %s) RETURNING {COLUMNS}"
)


def claim(conn: psycopg.Connection[Any], runner: str, worker: str, lease_seconds: int) -> dict[str, Any] | None:
    """Takes the oldest claimable job of `runner`'s kind; two claimers never get the same one."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "UPDATE jobs SET status = 'failed', error = format('its runner died %%s times', attempts), "
            "lease_until = NULL, updated_at = now() "
            "WHERE runner = %s AND status = 'running' AND lease_until < now() AND attempts >= max_attempts",
            (runner,),
        )
        cur.execute(
            f"UPDATE jobs SET status = 'running', attempts = attempts + 1, claimed_by = %s, "
            f"lease_until = now() + make_interval(secs => %s), updated_at = now() "
            f"WHERE id = (SELECT id FROM jobs WHERE runner = %s AND attempts < max_attempts "
            f"  AND ((status = 'queued' AND (lease_until IS NULL OR lease_until < now())) "
            f"    OR (status = 'running' AND lease_until < now())) "
            f"  ORDER BY created_at FOR UPDATE SKIP LOCKED LIMIT 1) "
            f"RETURNING {COLUMNS}",
            (worker, lease_seconds, runner),
        )
        return cur.fetchone()


def _holding(job: dict[str, Any]) -> tuple[Any, ...]:
    return (job["id"], job["claimed_by"], job["attempts"])


def extend(conn: psycopg.Connection[Any], job: dict[str, Any], lease_seconds: int) -> bool:
    cur = conn.execute(
        "UPDATE jobs SET lease_until = now() + make_interval(secs => %s) "
        "WHERE id = %s AND claimed_by = %s AND attempts = %s AND status = 'running'",
        (lease_seconds, *_holding(job)),
    )
    return cur.rowcount == 1


def complete(conn: psycopg.Connection[Any], job: dict[str, Any], result_path: str) -> bool:
    """Marks the job succeeded if this claim still holds it; False means another attempt has it."""
    cur = conn.execute(
        "UPDATE jobs SET status = 'succeeded', completions = completions + 1, result_path = %s, error = NULL, "
        "lease_until = NULL, updated_at = now() "
        "WHERE id = %s AND claimed_by = %s AND attempts = %s AND status = 'running'",
        (result_path, *_holding(job)),
    )
    return cur.rowcount == 1


RETRY_BACKOFF_SECONDS = 10


def _printable(text: str) -> str:
    """A reason fit for a text column: a failed program's output may hold NUL bytes."""
    return "".join(ch for ch in text if ch.isprintable() or ch in "\n\t")


def fail(conn: psycopg.Connection[Any], job: dict[str, Any], reason: str) -> None:
    """Records the reason; the job is queued again (after a backoff that grows with each
    attempt, so a node that is briefly down does not use up the attempts) while attempts
    remain, else failed."""
    conn.execute(
        "UPDATE jobs SET status = CASE WHEN attempts < max_attempts THEN 'queued' ELSE 'failed' END, "
        "error = %s, lease_until = CASE WHEN attempts < max_attempts "
        "  THEN now() + make_interval(secs => %s * attempts) END, updated_at = now() "
        "WHERE id = %s AND claimed_by = %s AND attempts = %s AND status = 'running'",
        (_printable(reason)[-2000:], RETRY_BACKOFF_SECONDS, *_holding(job)),
    )
