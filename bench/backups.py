"""PostgreSQL restore benchmarks on the dev stack (figures, not asserts).

Each run: a writer commits one timestamped row every 100 ms; at a moment drawn across the
archive_timeout window, every PostgreSQL node and data volume is removed (the backup volume
kept, as after losing the database host's disks); then the stack is restored to the latest
archived write through the program (`postgres.restoreTarget=latest`, `pulumi up --refresh`).
- RPO: the age, at the moment of loss, of the newest row the restored cluster has;
- restore time: from the apply's start to the stack healthy with its replica streaming.
With the default archiveTimeoutSeconds (60) and a tight one (10). Each figure with its runs
(bench.figure); with BENCH_JSON=path also written as JSON.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import psycopg

from bench import figure, record, runs_setting
from tests.e2e import chaos
from tests.e2e.conftest import Deployment, deployed

RUNS = runs_setting(5)
SETTINGS = {"default": 60, "tight": 10}


class Writer(threading.Thread):
    """Commits one row every 100 ms; remembers nothing but that it ran."""

    def __init__(self, deployment: Deployment) -> None:
        super().__init__(daemon=True)
        self.deployment = deployment
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            with chaos.pg_writer(self.deployment) as conn:
                while not self.stop.wait(0.1):
                    conn.execute("INSERT INTO bench_rpo (at) VALUES (clock_timestamp())")
        except psycopg.Error:
            pass  # the loss: the primary is gone


def one_run(deployment: Deployment, archive_timeout: int) -> dict[str, float]:
    with chaos.pg_writer(deployment) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_rpo (at timestamptz NOT NULL)")
        conn.execute("TRUNCATE bench_rpo")
    chaos.archive_everything(deployment)
    with chaos.pg_writer(deployment) as conn:
        archived = conn.execute("SELECT clock_timestamp()").fetchone()
    assert archived is not None
    writer = Writer(deployment)
    writer.start()
    time.sleep(random.uniform(5, 5 + archive_timeout))
    with chaos.pg_writer(deployment) as conn:
        row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    lost_at = row[0]
    chaos.wipe_postgres(deployment)
    writer.stop.set()
    writer.join()
    started = time.monotonic()
    chaos.restore_postgres(deployment, "latest")
    restore_seconds = time.monotonic() - started
    with chaos.pg_writer(deployment) as conn:
        newest = conn.execute("SELECT max(at) FROM bench_rpo").fetchone()
    assert newest is not None
    # No row restored: everything since the last archived point (taken just before) is lost.
    restorable = newest[0] if newest[0] is not None else archived[0]
    return {"rpo_s": (lost_at - restorable).total_seconds(), "restore_s": restore_seconds}


def restores(name: str, archive_timeout: int) -> list[dict[str, Any]]:
    overrides = {"postgres": {"archiveTimeoutSeconds": archive_timeout, "backupIncrementalIntervalMinutes": 0}}
    with deployed("dev", overrides, health_ticker=False) as deployment:
        while not chaos.pg_backups(deployment):
            time.sleep(1)
        runs = [one_run(deployment, archive_timeout) for _ in range(RUNS)]
    described = f"`archiveTimeoutSeconds: {archive_timeout}` ({name})"
    return [
        figure(
            f"PostgreSQL: every node and data volume lost (backup volume kept) → data lost (RPO), {described}",
            "s",
            [r["rpo_s"] for r in runs],
            1,
        ),
        figure(
            "the same → restored to the latest archived write and healthy, replica streaming "
            "(`restoreTarget: latest`, `pulumi up --refresh`), dev stack",
            "s",
            [r["restore_s"] for r in runs],
            1,
        ),
    ]


def main() -> None:
    figures = [figure for name, timeout in SETTINGS.items() for figure in restores(name, timeout)]
    record("backups", "PostgreSQL restore after losing every volume, dev stack", figures)


if __name__ == "__main__":
    main()
