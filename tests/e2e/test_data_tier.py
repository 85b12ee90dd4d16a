"""The data tier's promises on the prod stack's own containers, with failures made for real.

Tests run in file order and each leaves the cluster healthy for the next.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import redis

from components.topology import REDIS_MASTER_NAME
from tests.e2e import chaos, report
from tests.e2e.apply import run_healthcheck, wait_healthy
from tests.e2e.conftest import Deployment, deployed

STACK = "prod"


@pytest.fixture(scope="module")
def prod() -> Iterator[Deployment]:
    with deployed(STACK) as deployment:
        yield deployment


def wait_row(conn: psycopg.Connection, marker: str, timeout: float = 30) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if conn.execute("SELECT 1 FROM e2e_rows WHERE marker = %s", (marker,)).fetchone():
                return time.monotonic() - started
        except psycopg.errors.UndefinedTable:
            pass
        time.sleep(0.02)
    raise AssertionError(f"row {marker} not replicated within {timeout}s")


def ensure_table(prod: Deployment) -> None:
    with chaos.pg_writer(prod) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS e2e_rows (id bigserial PRIMARY KEY, marker text UNIQUE)")


# --- PostgreSQL (failovers: test_postgres_ha.py) -------------------------------------------


def test_every_replica_streams_through_its_own_slot(prod: Deployment) -> None:
    primary = chaos.pg_primary(prod)
    replicas = [n for n in prod.topology.postgres_nodes if n.hostname != primary]
    assert chaos.wait_streaming(prod, len(replicas)) == {r.hostname: "streaming" for r in replicas}
    with chaos.pg(prod, primary) as conn:
        slots = dict(conn.execute("SELECT slot_name, active FROM pg_replication_slots").fetchall())
        keep = conn.execute("SHOW max_slot_wal_keep_size").fetchone()
    assert slots == {r.slot_name: True for r in replicas}  # Patroni keeps one per member
    assert keep == ("1GB",)


def test_a_write_on_the_primary_reaches_every_replica_which_refuse_writes(prod: Deployment) -> None:
    ensure_table(prod)
    marker = str(uuid.uuid4())
    with chaos.pg_writer(prod) as primary:
        primary.execute("INSERT INTO e2e_rows (marker) VALUES (%s)", (marker,))
    delays = []
    for replica in chaos.pg_replicas(prod):
        with chaos.pg(prod, replica) as conn:
            delays.append(wait_row(conn, marker))
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute("INSERT INTO e2e_rows (marker) VALUES ('refused')")
    report.LINES.append("prod: write-to-visible on replicas: " + ", ".join(f"{d * 1000:.0f} ms" for d in delays))


def test_synchronous_commit_waits_for_a_synchronous_standby(prod: Deployment) -> None:
    # prod sets postgres.synchronous: Patroni names one standby synchronous, the other is a
    # candidate to replace it.
    primary = chaos.pg_primary(prod)
    replicas = set(chaos.pg_replicas(prod))
    deadline = time.monotonic() + 60
    while True:
        with chaos.pg(prod, primary) as conn:
            row = conn.execute("SHOW synchronous_standby_names").fetchone()
            states = dict(conn.execute("SELECT application_name, sync_state FROM pg_stat_replication").fetchall())
        names = str(row[0]) if row else ""
        synchronous = {name for name, state in states.items() if state == "sync"}
        if len(synchronous) == 1 and set(states) == replicas:
            break
        assert time.monotonic() < deadline, (names, states)
        time.sleep(1)
    assert names.strip('"') == synchronous.pop()
    assert sorted(states.values()) == ["async", "sync"]


def test_the_replication_role_connects_only_for_replication_and_only_with_its_password(prod: Deployment) -> None:
    address = chaos.data_ip(prod, chaos.pg_primary(prod))
    password = chaos.replication_password(prod)
    user = chaos.replication_user()
    # A plain SQL session of the replication role is refused, even with the right password.
    with pytest.raises(psycopg.OperationalError, match=r"pg_hba\.conf rejects connection"):
        psycopg.connect(host=address, user=user, password=password, dbname="transvidio", connect_timeout=3)
    # A replication connection with a wrong password is refused.
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            host=address, user=user, password="wrong", dbname="replication", replication="true", connect_timeout=3
        )
    # With its password, it may replicate.
    with psycopg.connect(
        host=address,
        user=user,
        password=password,
        dbname="replication",
        replication="true",
        connect_timeout=3,
        autocommit=True,
    ) as conn:
        assert conn.execute("IDENTIFY_SYSTEM").fetchone() is not None
    # From the edge network nothing reaches the primary at all (nginx has no route to it).
    code, _ = prod.exec("nginx", ["timeout", "3", "bash", "-c", f"</dev/tcp/{address}/5432"])
    assert code != 0


WRONG_REPLICATION_PASSWORD = """
import yaml
path = "/var/lib/postgresql/run/patroni.yml"
config = yaml.safe_load(open(path))
config["postgresql"]["authentication"]["replication"]["password"] = "not-the-password"
with open(path, "w") as out:
    yaml.safe_dump(config, out)
"""


def test_a_wrong_replication_password_fails_the_replica_loudly_and_leaves_the_primary_alone(
    prod: Deployment,
) -> None:
    # One replica is given a wrong password as a rotation gives a new one (Patroni's config
    # and pgpass rewritten, Patroni reloaded), then its WAL receiver connects afresh; the
    # tier's credentials store is left as it is.
    primary = chaos.pg_primary(prod)
    replica, *others = chaos.pg_replicas(prod)
    primary_started = chaos.started_at(prod, primary)
    since = time.time()
    code, output = prod.exec(replica, ["python3", "-c", WRONG_REPLICATION_PASSWORD])
    assert code == 0, output
    code, output = prod.exec(replica, ["pkill", "-HUP", "-f", "^/usr/bin/python3 /usr/bin/patroni"])
    assert code == 0, output
    chaos.wait_logged(prod, replica, since, "Reloading PostgreSQL configuration")
    code, output = prod.exec(
        replica, ["sh", "-c", "printf '*:*:*:replicator:not-the-password\\n' >/var/lib/postgresql/run/patroni-pgpass"]
    )
    assert code == 0, output
    chaos.reconnect_walreceiver(prod, replica)
    chaos.wait_logged(prod, replica, since, 'password authentication failed for user "replicator"')
    # The primary was neither restarted nor made unhealthy; the replica does not stream.
    assert chaos.started_at(prod, primary) == primary_started
    assert run_healthcheck(prod.client, prod.name(primary)) == "healthy"
    streaming = chaos.streaming_replicas(prod)
    assert replica not in streaming
    assert {k: v for k, v in streaming.items() if k in others} == dict.fromkeys(others, "streaming")
    # Restarted, it takes the real password from the store again and streams from its own data.
    prod.client.containers.get(prod.name(replica)).restart(timeout=30)
    chaos.wait_streaming(prod, len(prod.topology.postgres_replicas))


def test_a_killed_replica_restarts_resumes_from_its_volume_and_catches_up(prod: Deployment) -> None:
    ensure_table(prod)
    replica = chaos.pg_replicas(prod)[0]
    since = time.time()
    before = chaos.kill9(prod, replica)
    written = []
    with chaos.pg_writer(prod) as primary:
        for _ in range(50):  # while it is down: its slot keeps this WAL
            marker = str(uuid.uuid4())
            primary.execute("INSERT INTO e2e_rows (marker) VALUES (%s)", (marker,))
            written.append(marker)
    chaos.wait_restarted(prod, replica, before)
    log = chaos.logs(prod, replica, since)
    assert "bootstrap from leader" not in log  # no new clone: it resumed from its own data
    with chaos.pg(prod, replica) as conn:
        wait_row(conn, written[-1])
        count = conn.execute("SELECT count(*) FROM e2e_rows WHERE marker = ANY(%s)", (written,)).fetchone()
    assert count == (len(written),)


def test_a_replica_rebuilt_from_nothing_clones_the_primary_again_through_its_slot(prod: Deployment) -> None:
    primary = chaos.pg_primary(prod)
    replica = next(n for n in prod.topology.postgres_nodes if n.hostname != primary)
    container = prod.client.containers.get(prod.name(replica.hostname))
    container.remove(force=True)
    prod.client.volumes.get(f"transvidio-{STACK}-{replica.hostname}-data").remove(force=True)
    since = time.time()
    plan = prod.apply(refresh=True)  # `pulumi up --refresh`: the missing container is seen, and made again
    assert plan.names("create") == {replica.hostname} and plan.counts()["replace"] == 0
    wait_healthy(prod.client, prod.name(replica.hostname), timeout=120, check_now=True)
    assert "bootstrap from leader" in chaos.logs(prod, replica.hostname, since)
    chaos.wait_streaming(prod, len(prod.topology.postgres_replicas))
    with chaos.pg(prod, primary) as conn:
        row = conn.execute(
            "SELECT active, wal_status FROM pg_replication_slots WHERE slot_name = %s", (replica.slot_name,)
        ).fetchone()
    assert row == (True, "reserved")


def test_a_killed_primary_restarted_by_the_engine_loses_no_acknowledged_write(prod: Deployment) -> None:
    ensure_table(prod)
    primary = chaos.pg_primary(prod)
    acknowledged: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            marker = str(uuid.uuid4())
            try:
                with chaos.pg_writer(prod) as conn:
                    conn.execute("INSERT INTO e2e_rows (marker) VALUES (%s)", (marker,))
                acknowledged.append(marker)
            except psycopg.Error:
                time.sleep(0.2)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(2)
        before = chaos.kill9(prod, primary)
        chaos.wait_restarted(prod, primary, before, timeout=120)
        chaos.pg_primary(prod)  # whichever node holds the lock now
        chaos.wait_more_writes(acknowledged, 10)
    finally:
        stop.set()
        thread.join()
    with chaos.pg_writer(prod) as conn:
        present = {m for (m,) in conn.execute("SELECT marker FROM e2e_rows WHERE marker = ANY(%s)", (acknowledged,))}
    assert len(acknowledged) > 10
    assert present == set(acknowledged)
    chaos.wait_streaming(prod, len(prod.topology.postgres_replicas))


# --- Redis and Sentinel ---------------------------------------------------------------


def test_redis_replication_quorum_and_auth(prod: Deployment) -> None:
    master = chaos.wait_settled(prod)  # whichever node: earlier tests may have failed it over
    for sentinel in prod.topology.sentinels:
        direct = chaos.sentinel_direct(prod, sentinel.hostname)
        answer = direct.execute_command("SENTINEL", "CKQUORUM", REDIS_MASTER_NAME)
        assert answer.decode().startswith(f"OK {len(prod.topology.sentinels)} usable Sentinels")
        address = direct.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", REDIS_MASTER_NAME)
        assert address == [chaos.data_ip(prod, master).encode(), b"6379"], sentinel.hostname
    for node in prod.topology.redis_nodes:
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host=str(node.data_ip), port=6379, socket_timeout=2).ping()
    for sentinel in prod.topology.sentinels:
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host=str(sentinel.data_ip), port=26379, socket_timeout=2).ping()


def test_killing_the_master_fails_over_and_keeps_every_waited_write(prod: Deployment) -> None:
    old_master = chaos.wait_settled(prod)
    client = chaos.sentinel_client(prod).master_for(REDIS_MASTER_NAME, socket_timeout=1)
    acknowledged: list[str] = []
    for i in range(200):
        key = f"e2e:{uuid.uuid4()}"
        client.set(key, i)
        if client.execute_command("WAIT", 1, 1000) >= 1:
            acknowledged.append(key)
    before = chaos.kill9(prod, old_master)
    killed = time.monotonic()
    first_write = None
    while first_write is None and time.monotonic() - killed < 60:
        try:
            client.set("e2e:after-failover", "ok")
            first_write = time.monotonic() - killed
        except (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.ReadOnlyError,
            redis.exceptions.ResponseError,
        ):
            time.sleep(0.05)
    assert first_write is not None, "no write succeeded within 60 s of the kill"
    new_master = chaos.current_master(prod)
    assert new_master != old_master
    report.LINES.append(f"prod: redis master kill -9 -> first acknowledged write {first_write:.1f}s")
    missing = [k for k in acknowledged if chaos.redis_node(prod, new_master).get(k) is None]
    assert len(acknowledged) == 200 and missing == []
    # The old master comes back by the restart policy, as a replica of the new one.
    chaos.wait_restarted(prod, old_master, before)
    assert chaos.wait_settled(prod) == new_master
    info = chaos.replication(chaos.redis_node(prod, old_master))
    assert info["role"] == "slave" and info["master_host"] == chaos.data_ip(prod, new_master)


def test_a_restarted_sentinel_still_knows_the_current_master_and_its_quorum(prod: Deployment) -> None:
    master = chaos.wait_settled(prod)
    if master == prod.topology.redis_nodes[0].hostname:
        # The template names redis-0: move the master elsewhere first, so a Sentinel that
        # forgot its state and fell back to the template would be caught.
        chaos.sentinel_direct(prod, prod.topology.sentinels[1].hostname).execute_command(
            "SENTINEL", "FAILOVER", REDIS_MASTER_NAME
        )
        deadline = time.monotonic() + 60
        while (master := chaos.wait_settled(prod)) == prod.topology.redis_nodes[0].hostname:
            assert time.monotonic() < deadline, "the forced failover did not happen"
            time.sleep(0.5)
    sentinel = prod.topology.sentinels[0].hostname
    before = chaos.kill9(prod, sentinel)
    chaos.wait_restarted(prod, sentinel, before)
    direct = chaos.sentinel_direct(prod, sentinel)
    address, _ = direct.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", REDIS_MASTER_NAME)
    assert address.decode() == chaos.data_ip(prod, master)
    fields = direct.execute_command("SENTINEL", "MASTER", REDIS_MASTER_NAME)
    described = dict(zip(fields[::2], fields[1::2], strict=True))
    assert described[b"quorum"] == str(prod.topology.settings.redis.quorum).encode()


def test_restarting_every_redis_container_at_once_keeps_one_master_and_the_data(prod: Deployment) -> None:
    master = chaos.wait_settled(prod)
    client = chaos.redis_node(prod, master)
    keys = [f"e2e:all-down:{uuid.uuid4()}" for _ in range(20)]
    for key in keys:
        client.set(key, "kept")
    assert (
        client.execute_command("WAIT", len(prod.topology.redis_nodes) - 1, 5000) == len(prod.topology.redis_nodes) - 1
    )
    # Poll every node's role from the kill until settled: never two masters at one moment.
    samples: list[dict[str, str]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            samples.append(chaos.roles(prod))
            time.sleep(0.1)

    watcher = threading.Thread(target=poll)
    watcher.start()
    try:
        starts = {n.hostname: chaos.kill9(prod, n.hostname) for n in prod.topology.redis_nodes}
        for hostname, before in starts.items():
            chaos.wait_restarted(prod, hostname, before)
        settled = chaos.wait_settled(prod)
        # Two more samples: one of them begun after the settle, so the watch spans it all.
        taken = len(samples)
        chaos.wait_for(lambda: len(samples) > taken + 1, 30, "two role samples after the settle", interval=0.1)
    finally:
        stop.set()
        watcher.join()
    doubled = [roles for roles in samples if list(roles.values()).count("master") > 1]
    # Every node was restarted (wait_restarted saw each new start). The watch may not see one
    # down: redis-py retries a refused command, and a node back within that is never seen
    # down; nor does the number of samples prove anything, as a fast recovery gives few.
    assert doubled == []
    assert list(samples[-1].values()).count("master") == 1, samples[-1]
    assert [chaos.redis_node(prod, settled).get(key) for key in keys] == [b"kept"] * len(keys)
    report.LINES.append(f"prod: all Redis nodes killed at once: master {master} -> {settled}, never two masters")


def test_an_isolated_master_stops_taking_writes_and_a_failover_happens(prod: Deployment) -> None:
    settings_lag = prod.topology.settings.redis.min_replicas_max_lag
    # Redis counts a replica's lag in whole seconds since its last ACK (sent every second) and
    # recounts good replicas once a second; this loop adds up to a poll and an exec.
    bound = settings_lag + 1 + 1 + 1
    master = chaos.wait_settled(prod)
    chaos.disconnect(prod, master)
    cut = time.monotonic()
    try:
        admin = chaos.redis_admin(prod)
        password_env = {"REDISCLI_AUTH": admin.password}
        refused = accepted_late = None
        while time.monotonic() - cut < settings_lag + 15:
            result = prod.client.containers.get(prod.name(master)).exec_run(
                ["redis-cli", "--user", admin.username, "--no-auth-warning", "SET", "e2e:isolated", "x"],
                environment=password_env,
            )
            output = result.output.decode()
            elapsed = time.monotonic() - cut
            if "NOREPLICAS" in output:
                refused = elapsed
                break
            if elapsed > bound and output.strip() == "OK":
                accepted_late = elapsed
            time.sleep(0.5)
        assert refused is not None and refused <= bound, "the isolated master kept accepting writes"
        assert accepted_late is None
        deadline = time.monotonic() + 60
        while chaos.current_master(prod) == master:
            assert time.monotonic() < deadline, "no failover while the master was cut off"
            time.sleep(0.5)
    finally:
        chaos.reconnect(prod, master)
    new_master = chaos.wait_settled(prod)
    assert new_master != master
    assert list(chaos.roles(prod).values()).count("master") == 1


def test_the_dev_shape_fails_over_too() -> None:
    with deployed("dev") as dev:
        master = chaos.wait_settled(dev)
        client = chaos.sentinel_client(dev).master_for(REDIS_MASTER_NAME, socket_timeout=1)
        client.set("e2e:before", "1")
        before = chaos.kill9(dev, master)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.set("e2e:after", "1")
                break
            except (
                redis.exceptions.ConnectionError,
                redis.exceptions.TimeoutError,
                redis.exceptions.ReadOnlyError,
                redis.exceptions.ResponseError,
            ):
                assert time.monotonic() < deadline, "dev did not fail over"
                time.sleep(0.1)
        assert chaos.current_master(dev) != master
        chaos.wait_restarted(dev, master, before)
        assert chaos.wait_settled(dev) != master
