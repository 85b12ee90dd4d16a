"""PostgreSQL and Redis backups and restores on the dev stack, made for real.

Whichever node is primary archives every WAL segment and takes scheduled pgBackRest backups
into the backup volume; these tests wipe every PostgreSQL and etcd volume (the backup volume stays,
as it would after losing the database host's disks) and restore through the program:
`postgres.restoreTarget` set, `pulumi up --refresh`. Here a full backup is due every two minutes and an
incremental one every minute, one full backup kept, so the schedule and the retention
are seen within the test. Redis is copied every minute, two copies kept; its nodes and
Sentinels are wiped likewise and the group restored with `redis.restoreFrom`.
"""

from __future__ import annotations

import datetime
import itertools
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e import chaos, traffic
from tests.e2e.conftest import Deployment, deployed

BACKUP_OVERRIDES = {
    "postgres": {
        "backupFullIntervalMinutes": 2,
        "backupIncrementalIntervalMinutes": 1,
        "backupRetentionFull": 1,
        "archiveTimeoutSeconds": 10,
    },
    "redis": {"backupIntervalMinutes": 1, "backupRetention": 2},
}
ROWS_PER_BATCH = 100


@pytest.fixture(scope="module")
def dev() -> Iterator[Deployment]:
    with deployed("dev", BACKUP_OVERRIDES) as deployment:
        yield deployment


def add_batch(dev: Deployment, batch: int) -> None:
    with chaos.pg_writer(dev) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS restore_check (batch int NOT NULL, n int NOT NULL)")
        conn.execute("INSERT INTO restore_check SELECT %s, n FROM generate_series(1, %s) AS n", (batch, ROWS_PER_BATCH))


def batches(dev: Deployment) -> dict[int, int]:
    with chaos.pg_writer(dev) as conn:
        rows = conn.execute("SELECT batch, count(*) FROM restore_check GROUP BY batch ORDER BY batch").fetchall()
    return {batch: count for batch, count in rows}


def application_writes(dev: Deployment) -> None:
    """A job recorded through nginx and a backend: the application role on the primary."""
    status, _, body = traffic.request(dev, "POST", "/api/uploads", body=b"restored video")
    assert status == 201, body
    upload_id = json.loads(body)["upload_id"]
    job = json.dumps({"upload_id": upload_id, "duration_seconds": 2, "target_language": "fr"}).encode()
    deadline = time.monotonic() + 60
    while True:  # the backends' pools reconnect to the restored primary
        status, _, body = traffic.request(dev, "POST", "/api/jobs", body=job)
        if status == 201 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert status == 201, body


def test_full_and_incremental_backups_run_on_schedule_and_retention_expires_the_old_set(dev: Deployment) -> None:
    first = chaos.wait_for(
        lambda: [b for b in chaos.pg_backups(dev) if b["type"] == "full"], 90, "a first full backup"
    )[0]
    # A minute later an incremental one on top of it; two minutes after the first, the next
    # full one, and with one full backup kept the first set (full and incremental) expires.
    incremental = chaos.wait_for(
        lambda: [b for b in chaos.pg_backups(dev) if b["type"] == "incr"], 90, "an incremental backup"
    )[0]
    assert incremental["prior"] == first["label"]
    assert incremental["timestamp"]["start"] >= first["timestamp"]["stop"] + 60

    def first_set_expired() -> list[dict[str, Any]]:
        current = chaos.pg_backups(dev)
        labels = {first["label"], incremental["label"]}
        fulls = [b for b in current if b["type"] == "full"]
        return current if fulls and not labels & {b["label"] for b in current} else []

    later = chaos.wait_for(first_set_expired, 150, "a second full backup and the first set expired")
    assert later[0]["type"] == "full"
    assert later[0]["timestamp"]["start"] >= first["timestamp"]["stop"] + 120


def test_an_empty_primary_is_never_initialised_over_existing_backups(dev: Deployment) -> None:
    chaos.wait_for(lambda: chaos.pg_backups(dev), 90, "a backup in the repository")
    add_batch(dev, 0)
    chaos.archive_everything(dev)
    chaos.wipe_postgres(dev)
    with pytest.raises(Exception) as refused:  # the apply's error, as the Pulumi runtime re-raises it
        dev.apply(refresh=True)
    assert "container transvidio-dev-postgres-primary exited (code 65" in str(refused.value)
    assert "not initialising an empty database over them" in str(refused.value)
    chaos.restore_postgres(dev, "latest")
    assert batches(dev)[0] == ROWS_PER_BATCH


def test_a_wiped_stack_is_restored_to_the_latest_write_and_to_a_point_in_time(dev: Deployment) -> None:
    chaos.wait_for(lambda: chaos.pg_backups(dev), 90, "a backup in the repository")
    add_batch(dev, 1)
    time.sleep(1)
    with chaos.pg_writer(dev) as conn:
        row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    between = row[0]
    time.sleep(1)
    add_batch(dev, 2)
    chaos.archive_everything(dev)

    chaos.wipe_postgres(dev)
    chaos.restore_postgres(dev, "latest")
    restored = batches(dev)
    assert (restored.get(1), restored.get(2)) == (ROWS_PER_BATCH, ROWS_PER_BATCH)
    application_writes(dev)

    chaos.wipe_postgres(dev)
    target = between.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")
    chaos.restore_postgres(dev, target)
    restored = batches(dev)
    assert (restored.get(1), restored.get(2)) == (ROWS_PER_BATCH, None)
    application_writes(dev)


# --- Redis --------------------------------------------------------------------------------


def backup_time(name: str) -> datetime.datetime:
    return datetime.datetime.strptime(name, "redis-%Y%m%dT%H%M%SZ.rdb").replace(tzinfo=datetime.UTC)


def test_redis_is_copied_every_interval_and_only_the_newest_copies_are_kept(dev: Deployment) -> None:
    retention = dev.topology.settings.redis.backup_retention
    seen: set[str] = set()

    def three_taken() -> bool:
        seen.update(chaos.redis_backups(dev))
        return len(seen) >= retention + 1

    chaos.wait_for(three_taken, 200, f"{retention + 1} Redis backups")
    kept = chaos.redis_backups(dev)
    assert len(kept) == retention and kept == sorted(seen)[-retention:]  # the oldest expired
    times = [backup_time(name) for name in sorted(seen)]
    assert all(later - earlier >= datetime.timedelta(seconds=59) for earlier, later in itertools.pairwise(times))
    # Each is an RDB file, as Redis writes one.
    code, magic = dev.exec("redis-backup", ["head", "-c", "5", f"/backups/{kept[-1]}"])
    assert (code, magic) == (0, "REDIS")
    # Every copy came from the streaming replica, not the master: a copy from the master
    # shows in its INFO as one more replica, which the Sentinels would list for good.
    logs = dev.client.containers.get(dev.name("redis-backup")).logs().decode()
    master = chaos.current_master(dev)
    replicas = {str(node.data_ip) for node in dev.topology.redis_nodes if node.hostname != master}
    sources = re.findall(r"taken from the (\w+) (\S+)", logs)
    assert len(sources) >= retention + 1 and all(s[0] == "replica" and s[1] in replicas for s in sources), logs
    assert chaos.sentinels_know(dev, len(replicas))


def test_a_wiped_redis_group_is_restored_from_its_latest_backup(dev: Deployment) -> None:
    master = chaos.redis_node(dev, chaos.current_master(dev))
    master.set("job:e2e-restored", "from the backup")
    written = datetime.datetime.now(datetime.UTC)
    chaos.wait_for(
        lambda: [b for b in chaos.redis_backups(dev) if backup_time(b) >= written + datetime.timedelta(seconds=1)],
        150,
        "a Redis backup taken after the write",
    )
    chaos.wipe_redis(dev)
    dev.apply({"redis": {"restoreFrom": "latest"}}, refresh=True)
    dev.wait_all_healthy()
    restored = chaos.current_master(dev)
    assert chaos.redis_node(dev, restored).get("job:e2e-restored") == b"from the backup"
    # The replica took the restored data set from the master.
    replica = next(n.hostname for n in dev.topology.redis_nodes if n.hostname != restored)
    deadline = time.monotonic() + 60
    while chaos.redis_node(dev, replica).get("job:e2e-restored") != b"from the backup":
        assert time.monotonic() < deadline, "the replica never had the restored data"
        time.sleep(0.5)
    # The setting back to empty: the master, which has data now, is replaced and keeps it.
    dev.apply({"redis": {"restoreFrom": ""}})
    dev.wait_all_healthy()
    assert chaos.redis_node(dev, chaos.current_master(dev)).get("job:e2e-restored") == b"from the backup"


def test_a_restore_from_a_backup_that_is_not_there_refuses_to_start_empty(dev: Deployment) -> None:
    chaos.wipe_redis(dev)
    with pytest.raises(Exception) as refused:
        dev.apply({"redis": {"restoreFrom": "redis-20000101T000000Z.rdb"}}, refresh=True)
    assert "container transvidio-dev-redis-0 exited (code 65" in str(refused.value)
    assert "no such backup" in str(refused.value)
    dev.apply({"redis": {"restoreFrom": "latest"}}, refresh=True)
    dev.wait_all_healthy()
    assert chaos.redis_node(dev, chaos.current_master(dev)).get("job:e2e-restored") == b"from the backup"
    dev.apply({"redis": {"restoreFrom": ""}})
    dev.wait_all_healthy()
