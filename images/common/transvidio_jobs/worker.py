"""The claim loop shared by the backend's short-job worker and the MPI master's runner."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import make_conninfo

from transvidio_jobs import queue

log = logging.getLogger("transvidio.worker")

LEASE_SECONDS = int(os.environ.get("JOB_LEASE_SECONDS", "15"))
POLL_SECONDS = float(os.environ.get("JOB_POLL_SECONDS", "0.5"))
# How long a finished attempt keeps trying to record its outcome: longer than a failover.
RECORD_SECONDS = 60.0
RECORD_RETRY_SECONDS = 2.0

# Runs one claimed job; returns the result path (relative to outputs) or raises.
Execute = Callable[[dict[str, Any]], str]


# A primary cut off the network answers nothing: without these, a query sent to it waits
# until TCP gives up (minutes). With them the connection fails within about 8 s and the
# next connect walks the host list to the new primary. The backends' pools use them too.
CONNECTION_TIMEOUTS = {
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "2",
    "tcp_user_timeout": "8000",
}


# The runners' own bookkeeping (claim, lease, completion) commits without waiting for the
# synchronous standby. Such a wait has no bound (PostgreSQL ends statement_timeout before
# the commit's wait) and holds the job's row locked, so no other runner can take the job over
# while the primary waits for a standby that is gone. Losing one of these commits in a
# failover only runs a job again: completion stays exactly-once (it needs the claim held).
# The API's commits (a job accepted) still wait for the standby.
BOOKKEEPING_OPTIONS = "-c synchronous_commit=local"


def primary_conninfo() -> str:
    env = os.environ
    with open(env["POSTGRES_PASSWORD_FILE"]) as secret:  # a file, never an environment value
        password = secret.read().strip()
    return make_conninfo(
        host=env["POSTGRES_MASTER_HOST"],
        port=env.get("POSTGRES_PORT", "5432"),
        dbname=env["POSTGRES_DB"],
        user=env["POSTGRES_USER"],
        password=password,
        connect_timeout="3",
        # POSTGRES_MASTER_HOST lists every node: connect to whichever is primary now.
        target_session_attrs="read-write",
        options=BOOKKEEPING_OPTIONS,
        **CONNECTION_TIMEOUTS,
    )


class Heartbeat(threading.Thread):
    """Extends the job's lease while it runs, on its own connection."""

    def __init__(self, conninfo: str, job: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.conninfo, self.job = conninfo, job
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(LEASE_SECONDS / 3):
            try:
                with psycopg.connect(self.conninfo, autocommit=True) as conn:
                    queue.extend(conn, self.job, LEASE_SECONDS)
            except psycopg.Error as error:
                log.warning("lease of job %s not extended: %s", self.job["id"], error)


Outcome = TypeVar("Outcome")


def record(
    conn: psycopg.Connection[Any],
    conninfo: str,
    job: dict[str, Any],
    write: Callable[[psycopg.Connection[Any]], Outcome],
) -> Outcome:
    """Writes an attempt's outcome on the claim connection or, when that fails, on new ones
    for up to RECORD_SECONDS. The claim connection sat idle for the whole run (an hour for a
    long MPI job) and may be gone (a failover, a cut): without this the outcome would be lost
    and the job run again from the start once its lease expired. Retrying is safe because
    both writes hold only while this attempt still holds the claim."""
    try:
        return write(conn)
    except psycopg.Error as error:
        log.warning("job %s: outcome not recorded, retrying on a new connection: %s", job["id"], error)
    deadline = time.monotonic() + RECORD_SECONDS
    while True:
        try:
            with psycopg.connect(conninfo, autocommit=True) as fresh:
                return write(fresh)
        except psycopg.Error as error:
            if time.monotonic() >= deadline:
                raise
            log.warning("job %s: outcome not recorded yet: %s", job["id"], error)
            time.sleep(RECORD_RETRY_SECONDS)


def run_once(conn: psycopg.Connection[Any], conninfo: str, runner: str, worker: str, execute: Execute) -> bool:
    """Claims and runs at most one job; True if there was one. `conn` is the claim connection."""
    job = queue.claim(conn, runner, worker, LEASE_SECONDS)
    if job is None:
        return False
    log.info("job %s: attempt %s on %s", job["id"], job["attempts"], worker)
    heartbeat = Heartbeat(conninfo, job)
    heartbeat.start()
    try:
        result_path = execute(job)
    except Exception as error:  # noqa: BLE001 - any failure is recorded on the job
        heartbeat.stopped.set()
        reason = f"{type(error).__name__}: {error}"
        record(conn, conninfo, job, lambda db: queue.fail(db, job, reason))
        log.warning("job %s failed: %s", job["id"], error)
        return True
    heartbeat.stopped.set()
    done = record(conn, conninfo, job, lambda db: queue.complete(db, job, result_path))
    log.info("job %s %s", job["id"], "succeeded" if done else "was taken over; result discarded")
    return True


def run_forever(runner: str, execute: Execute, stop: threading.Event | None = None) -> None:
    """Polls the queue on one long-lived connection (a new one only after an error)."""
    conninfo = primary_conninfo()
    # The MPI master's runner is PID 1 in every incarnation: the token tells a claim held by a
    # runner that died from one held by its successor (in claimed_by and in the logs).
    worker = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    stop = stop or threading.Event()
    conn: psycopg.Connection[Any] | None = None
    while not stop.is_set():
        try:
            if conn is None or conn.closed:
                conn = psycopg.connect(conninfo, autocommit=True)
                queue.ensure_schema(conn)
            if not run_once(conn, conninfo, runner, worker, execute):
                stop.wait(POLL_SECONDS)
        except psycopg.Error as error:
            log.warning("job queue unavailable: %s", error)
            if conn is not None:
                conn.close()
            conn = None
            stop.wait(2)
