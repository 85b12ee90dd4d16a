"""Failures made for real, and the clients the data-tier tests and benchmarks use.

kill -9 of a container's main process from the host (what a crash looks like to the
engine, which then applies the restart policy), network disconnects, and clients that
reach the data tier at the containers' fixed addresses (the host is the bridge's
gateway, inside the data subnet that pg_hba allows).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any, Self, cast

import docker
import docker.errors
import psycopg
import redis
import redis.sentinel
from transvidio_jobs import worker

from components.topology import (
    POSTGRES_DB,
    POSTGRES_REPLICATION_USER,
    REDIS_ADMIN_USER,
    REDIS_MASTER_NAME,
    SENTINEL_PORT,
    Node,
)
from tests.e2e.apply import wait_healthy
from tests.e2e.conftest import Deployment
from tests.program import plain


def node(deployment: Deployment, hostname: str) -> Node:
    return next(n for n in deployment.topology.all_nodes if n.hostname == hostname)


def data_ip(deployment: Deployment, hostname: str) -> str:
    address = node(deployment, hostname).data_ip
    assert address is not None
    return address


def started_at(deployment: Deployment, hostname: str) -> str:
    return str(deployment.client.api.inspect_container(deployment.name(hostname))["State"]["StartedAt"])


def kill9(deployment: Deployment, hostname: str) -> str:
    """SIGKILL the container's main process from the host; returns its previous start time."""
    state = deployment.client.api.inspect_container(deployment.name(hostname))["State"]
    os.kill(int(state["Pid"]), signal.SIGKILL)
    return str(state["StartedAt"])


def signal_process(deployment: Deployment, hostname: str, command: str, signum: signal.Signals) -> None:
    """Sends `signum`, from the host, to the container's processes whose command line holds `command`."""
    top = deployment.client.api.top(deployment.name(hostname), ps_args="-eo pid,args")
    pids = [int(row[0]) for row in top["Processes"] if command in row[1]]
    assert pids, f"no process running {command!r} in {hostname}: {top['Processes']}"
    for pid in pids:
        os.kill(pid, signum)


def wait_restarted(deployment: Deployment, hostname: str, before: str, timeout: float = 120) -> None:
    """Until the restart policy has started the container again, then until its own
    healthcheck passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = deployment.client.api.inspect_container(deployment.name(hostname))["State"]
            if state.get("Running") and state.get("StartedAt") != before:
                remaining = max(5, deadline - time.monotonic())
                wait_healthy(deployment.client, deployment.name(hostname), timeout=remaining, check_now=True)
                return
        except docker.errors.APIError:
            pass  # Podman cannot inspect a container mid-restart
        time.sleep(0.2)
    raise AssertionError(f"{hostname} was not restarted within {timeout}s")


def logs(deployment: Deployment, hostname: str, since: float | None = None) -> str:
    raw = deployment.client.api.logs(deployment.name(hostname), since=int(since) if since else None)
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


def wait_logged(deployment: Deployment, hostname: str, since: float, text: str, timeout: float = 60) -> str:
    """Until the container has logged `text` since `since`; returns those logs."""
    deadline = time.monotonic() + timeout
    while text not in (log := logs(deployment, hostname, since)):
        assert time.monotonic() < deadline, f"{hostname} did not log {text!r} in {timeout}s: {log[-2000:]}"
        time.sleep(0.5)
    return log


def disconnect(deployment: Deployment, hostname: str) -> None:
    deployment.client.networks.get(f"transvidio-{deployment.stack}-data").disconnect(deployment.name(hostname))


def _drop_incoming(deployment: Deployment, hostname: str, action: str) -> None:
    pid = deployment.client.api.inspect_container(deployment.name(hostname))["State"]["Pid"]
    rule = ["INPUT", "!", "-i", "lo", "-j", "DROP"]  # its own loopback (healthcheck) still works
    subprocess.run(["nsenter", "-t", str(pid), "-n", "iptables", action, *rule], check=True)


def silence(deployment: Deployment, hostname: str) -> None:
    """Every packet that reaches the container is dropped, as when its node is lost: no reset,
    no refusal; a client's queries and new connections go unanswered until TCP gives up.
    (Stopping or disconnecting it answers them at once, or after ARP gives up.)"""
    _drop_incoming(deployment, hostname, "-I")


def unsilence(deployment: Deployment, hostname: str) -> None:
    _drop_incoming(deployment, hostname, "-D")


def reconnect(deployment: Deployment, hostname: str) -> None:
    """Back on the data network with the address and alias the program gave it."""
    registration = deployment.evaluation.containers[deployment.name(hostname)]
    data = next(n for n in plain(registration.inputs["networksAdvanced"]) if n["name"].endswith("-data"))
    deployment.client.networks.get(data["name"]).connect(
        deployment.name(hostname), aliases=data["aliases"], ipv4_address=data["ipv4Address"]
    )


# --- PostgreSQL -----------------------------------------------------------------------


def app_password(deployment: Deployment) -> str:
    dsn = str(deployment.export("postgresPrimaryDsn"))
    return dsn.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]


def pg(deployment: Deployment, hostname: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """The application role's connection to a node (or to a list of addresses), as a backend makes it."""
    dsn = str(deployment.export("postgresPrimaryDsn"))
    user = dsn.split("://", 1)[1].split(":", 1)[0]
    options: dict[str, Any] = {"connect_timeout": 3, **kwargs}
    host = data_ip(deployment, hostname) if "," not in hostname else hostname
    return psycopg.connect(
        host=host,
        port=5432,
        dbname=POSTGRES_DB,
        user=user,
        password=app_password(deployment),
        autocommit=True,
        **options,
    )


def replication_password(deployment: Deployment) -> str:
    """As the tier's credentials writer was given it (the nodes read it from its store)."""
    registration = deployment.evaluation.containers[deployment.name("postgres-credentials")]
    uploads = {u["file"]: u["content"] for u in plain(registration.inputs["uploads"])}
    return str(next(v for k, v in uploads.items() if k.endswith("/replication-password")))


def reconnect_walreceiver(deployment: Deployment, hostname: str) -> None:
    """Ends a replica's WAL receiver: PostgreSQL starts a new one, which connects afresh."""
    code, output = deployment.exec(hostname, ["pkill", "-TERM", "-f", "^postgres: .*walreceiver"])
    assert code == 0, output


def pg_writer(deployment: Deployment, **kwargs: Any) -> psycopg.Connection[Any]:
    """A connection to whichever node is primary, found as the app finds it (libpq's host
    list with target_session_attrs=read-write), over the nodes' fixed addresses."""
    nodes = deployment.topology.postgres_nodes
    return pg(deployment, ",".join(str(n.data_ip) for n in nodes), target_session_attrs="read-write", **kwargs)


def pg_role(deployment: Deployment, hostname: str) -> str:
    """primary or replica, as the node itself answers; down when it does not."""
    try:
        with pg(deployment, hostname, connect_timeout=2) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    except psycopg.Error as error:
        return f"down ({type(error).__name__})"
    return "replica" if row and row[0] else "primary"


def pg_roles(deployment: Deployment) -> dict[str, str]:
    return {n.hostname: pg_role(deployment, n.hostname) for n in deployment.topology.postgres_nodes}


def pg_primary(deployment: Deployment, timeout: float = 90, other_than: str | None = None) -> str:
    """Until exactly one node is primary (and it is not `other_than`); returns its hostname."""
    deadline = time.monotonic() + timeout
    roles: dict[str, str] = {}
    while time.monotonic() < deadline:
        roles = pg_roles(deployment)
        primaries = [host for host, role in roles.items() if role == "primary"]
        if len(primaries) == 1 and primaries[0] != other_than:
            return primaries[0]
        time.sleep(0.5)
    patroni = {n.hostname: logs(deployment, n.hostname)[-1500:] for n in deployment.topology.postgres_nodes}
    etcd = deployment.topology.etcd_nodes[0]
    _, keys = deployment.exec(etcd.hostname, ["etcdctl", "get", "--prefix", "/transvidio/"])
    raise AssertionError(
        f"no single primary{' other than ' + other_than if other_than else ''} in {timeout}s: {roles}; "
        f"Patroni's keys: {keys}; last logs: {patroni}"
    )


def pg_replicas(deployment: Deployment) -> list[str]:
    primary = pg_primary(deployment)
    return [n.hostname for n in deployment.topology.postgres_nodes if n.hostname != primary]


def wait_more_writes(acknowledged: list[str], more: int, timeout: float = 60) -> None:
    """Until a writer thread has `more` acknowledged writes than now: writes resumed."""
    target = len(acknowledged) + more
    deadline = time.monotonic() + timeout
    while len(acknowledged) < target:
        assert time.monotonic() < deadline, f"writes did not resume within {timeout}s"
        time.sleep(0.1)


def streaming_replicas(deployment: Deployment) -> dict[str, str]:
    """application_name (Patroni's member name: the hostname) -> state, as the primary sees them."""
    with pg_writer(deployment) as conn:
        rows = conn.execute("SELECT application_name, state FROM pg_stat_replication").fetchall()
    return {str(name): str(state) for name, state in rows}


def wait_streaming(deployment: Deployment, count: int, timeout: float = 90) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    rows: dict[str, str] = {}
    while time.monotonic() < deadline:
        try:
            rows = streaming_replicas(deployment)
        except psycopg.OperationalError:
            rows = {}
        if list(rows.values()).count("streaming") >= count:
            return rows
        time.sleep(0.5)
    raise AssertionError(f"{count} replicas not streaming after {timeout}s: {rows}")


def replication_user() -> str:
    return POSTGRES_REPLICATION_USER


# --- Redis ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisUser:
    username: str
    password: str


def redis_admin(deployment: Deployment) -> RedisUser:
    """The operators' Redis user (on every node and Sentinel), as the tests act as operators."""
    return RedisUser(REDIS_ADMIN_USER, str(deployment.export("redisAdminPassword")))


def redis_node(deployment: Deployment, hostname: str, user: RedisUser | None = None) -> redis.Redis:
    user = user or redis_admin(deployment)
    return redis.Redis(
        host=data_ip(deployment, hostname),
        port=6379,
        username=user.username,
        password=user.password,
        socket_timeout=2,
        socket_connect_timeout=2,
    )


def sentinel_client(deployment: Deployment) -> redis.sentinel.Sentinel:
    admin = redis_admin(deployment)
    return redis.sentinel.Sentinel(
        [(s.data_ip, SENTINEL_PORT) for s in deployment.topology.sentinels],
        sentinel_kwargs={"username": admin.username, "password": admin.password, "socket_timeout": 1},
        username=admin.username,
        password=admin.password,
        socket_timeout=1,
        socket_connect_timeout=1,
    )


def sentinel_direct(deployment: Deployment, hostname: str, user: RedisUser | None = None) -> redis.Redis:
    user = user or redis_admin(deployment)
    return redis.Redis(
        host=data_ip(deployment, hostname),
        port=SENTINEL_PORT,
        username=user.username,
        password=user.password,
        socket_timeout=2,
        socket_connect_timeout=2,
    )


def replication(client: redis.Redis) -> dict[str, Any]:
    """INFO replication as a dict (redis-py types it as sync-or-async)."""
    return cast(dict[str, Any], client.info("replication"))


def current_master(deployment: Deployment) -> str:
    """The hostname of the node the Sentinels call master."""
    address, _ = sentinel_client(deployment).discover_master(REDIS_MASTER_NAME)
    return next(n.hostname for n in deployment.topology.redis_nodes if n.data_ip == address)


def roles(deployment: Deployment) -> dict[str, str]:
    result = {}
    for n in deployment.topology.redis_nodes:
        try:
            result[n.hostname] = str(replication(redis_node(deployment, n.hostname))["role"])
        except redis.exceptions.RedisError as error:
            result[n.hostname] = f"down ({type(error).__name__})"
    return result


def sentinels_know(deployment: Deployment, replicas: int) -> bool:
    """Every Sentinel lists every replica as up (a fresh Sentinel learns them from INFO)."""
    for sentinel in deployment.topology.sentinels:
        known = sentinel_direct(deployment, sentinel.hostname).execute_command(
            "SENTINEL", "REPLICAS", REDIS_MASTER_NAME
        )
        flags = [dict(zip(entry[::2], entry[1::2], strict=True)).get(b"flags") for entry in known]
        if len(flags) != replicas or any(flag != b"slave" for flag in flags):
            return False
    return True


def wait_settled(deployment: Deployment, timeout: float = 90) -> str:
    """Until one master, every other node its connected replica, known to every Sentinel."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            master = current_master(deployment)
            info = replication(redis_node(deployment, master))
            last = (master, roles(deployment), info.get("connected_slaves"))
            replicas = len(deployment.topology.redis_nodes) - 1
            one_master = list(last[1].values()).count("master") == 1 and info["role"] == "master"
            if one_master and info.get("connected_slaves") == replicas and sentinels_know(deployment, replicas):
                return master
        except redis.exceptions.RedisError as error:
            last = repr(error)
        time.sleep(0.5)
    raise AssertionError(f"Redis did not settle on one master with every replica in {timeout}s: {last}")


# --- PostgreSQL backups ----------------------------------------------------------------

SUPERUSER_PSQL = ["psql", "--host=/var/lib/postgresql/run", "--dbname=postgres", "-Atq", "-c"]


def wait_for(condition: Any, timeout: float, what: str, interval: float = 1.0) -> Any:
    """condition()'s first truthy result, polled every `interval` seconds; fails naming
    `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"not within {timeout:.0f}s: {what}"
        time.sleep(interval)
    return result


def pg_backups(deployment: Deployment) -> list[dict[str, Any]]:
    """The repository's backups, oldest first, as `pgbackrest info` reports them."""
    code, output = deployment.exec(pg_primary(deployment), ["pgbackrest", "info", "--output=json"])
    assert code == 0, output
    return list(json.loads(output)[0].get("backup", []))


def archive_everything(deployment: Deployment, timeout: float = 60) -> None:
    """Waits until the WAL holding every write so far is in the repository."""
    # As the operator would, through the local socket: pg_switch_wal needs the superuser.
    primary = pg_primary(deployment)
    code, output = deployment.exec(primary, [*SUPERUSER_PSQL, "SELECT pg_walfile_name(pg_switch_wal())"])
    assert code == 0, output
    segment = output.strip()
    deadline = time.monotonic() + timeout
    while True:
        code, output = deployment.exec(
            primary, [*SUPERUSER_PSQL, "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver"]
        )
        if code == 0 and output.strip() >= segment:
            return
        assert time.monotonic() < deadline, f"WAL segment {segment} not archived within {timeout:.0f}s"
        time.sleep(0.5)


def wipe_postgres(deployment: Deployment) -> None:
    """Every PostgreSQL node and etcd member gone with its volume, as with a lost disk; the
    backup volume kept."""
    nodes = [*deployment.topology.postgres_nodes, *deployment.topology.etcd_nodes]
    for lost in nodes:
        deployment.client.containers.get(lost.container_name).remove(force=True)
    for lost in nodes:
        deployment.client.volumes.get(f"{deployment.name(lost.hostname)}-data").remove(force=True)


def restore_postgres(deployment: Deployment, target: str) -> None:
    """`pulumi config set --path postgres.restoreTarget TARGET && pulumi up --refresh`, until healthy."""
    deployment.apply({"postgres": {"restoreTarget": target}}, refresh=True)
    deployment.wait_all_healthy()
    wait_streaming(deployment, len(deployment.topology.postgres_replicas))


def redis_backups(deployment: Deployment) -> list[str]:
    """The Redis backups' names, oldest first, as the backup job keeps them."""
    code, output = deployment.exec("redis-backup", ["find", "/backups", "-maxdepth", "1", "-name", "redis-*.rdb"])
    assert code == 0, output
    return sorted(line.rsplit("/", 1)[1] for line in output.split())


def wipe_redis(deployment: Deployment) -> None:
    """Every Redis node and Sentinel gone with its volume, as with a lost disk; the backups kept."""
    lost = [*deployment.topology.redis_nodes, *deployment.topology.sentinels]
    for node in lost:
        deployment.client.containers.get(node.container_name).remove(force=True)
    for node in lost:
        deployment.client.volumes.get(f"{deployment.name(node.hostname)}-data").remove(force=True)


# --- PostgreSQL failovers --------------------------------------------------------------


def patroni_cluster(deployment: Deployment) -> dict[str, Any]:
    """Patroni's view of the cluster (GET /cluster on the first node that answers)."""
    for node in deployment.topology.postgres_nodes:
        try:
            with urllib.request.urlopen(f"http://{node.data_ip}:8008/cluster", timeout=3) as response:
                return cast(dict[str, Any], json.loads(response.read()))
        except OSError:
            continue
    return {}


def wait_pg_settled(deployment: Deployment, timeout: float = 120) -> str:
    """Until one primary, every replica streaming and, with synchronous on, a synchronous
    standby recorded by Patroni (until then no replica may be promoted); returns the primary."""
    primary = pg_primary(deployment, timeout)
    wait_streaming(deployment, len(deployment.topology.postgres_replicas), timeout)
    if deployment.topology.settings.postgres.synchronous and deployment.topology.postgres_replicas:
        deadline = time.monotonic() + timeout
        while not any(m.get("role") == "sync_standby" for m in patroni_cluster(deployment).get("members", [])):
            assert time.monotonic() < deadline, f"no synchronous standby in {timeout}s: {patroni_cluster(deployment)}"
            time.sleep(0.5)
    return primary


def lose_for_good(deployment: Deployment, hostname: str) -> float:
    """A host gone: the container killed and not restarted by the engine; returns when."""
    deployment.client.containers.get(deployment.name(hostname)).update(restart_policy={"Name": "no"})
    kill9(deployment, hostname)
    return time.monotonic()


def bring_back(deployment: Deployment, hostname: str) -> None:
    """The lost host back: its restart policy as the program set it, the container started."""
    container = deployment.client.containers.get(deployment.name(hostname))
    container.update(restart_policy={"Name": "unless-stopped"})
    container.start()


def pg_local_role(deployment: Deployment, hostname: str) -> str:
    """A node's role as its own superuser sees it through the local socket: works for a node
    cut off the network too."""
    try:
        code, output = deployment.exec(hostname, [*SUPERUSER_PSQL, "SELECT pg_is_in_recovery()"])
    except docker.errors.APIError as error:
        return f"down ({error.status_code})"
    if code != 0:
        return "down"
    return {"t": "replica", "f": "primary"}.get(output.strip(), f"unknown ({output.strip()})")


class Background(threading.Thread):
    """A daemon thread run for the length of a `with` block: `stopped` tells `run` to end."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stopped = threading.Event()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.join()


class PrimaryWatch(Background):
    """Polls every PostgreSQL node's own view of its role (over the network, or through the
    engine when it does not answer there); `most_primaries` is the most nodes that called
    themselves primary in one round."""

    def __init__(self, deployment: Deployment) -> None:
        super().__init__()
        self.deployment = deployment
        self.most_primaries = 0
        self.seen: list[dict[str, str]] = []

    def run(self) -> None:
        while not self.stopped.is_set():
            roles = pg_roles(self.deployment)
            for hostname, role in roles.items():
                if role.startswith("down"):  # cut off, or gone: ask it through the engine
                    roles[hostname] = pg_local_role(self.deployment, hostname)
            self.most_primaries = max(self.most_primaries, list(roles.values()).count("primary"))
            if not self.seen or self.seen[-1] != roles:
                self.seen.append(roles)
            self.stopped.wait(0.25)


class Writer(Background):
    """Inserts rows through the app's connection logic (every node listed, the primary
    chosen by libpq), one connection kept as a pool would; records what was acknowledged."""

    def __init__(self, deployment: Deployment, table: str = "ha_rows") -> None:
        super().__init__()
        self.deployment, self.table = deployment, table
        self.acknowledged: list[str] = []
        self.acknowledged_at: list[float] = []
        self.acknowledged_by: list[str] = []
        self.failed_at: list[float] = []
        with pg_writer(deployment) as conn:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (id bigserial PRIMARY KEY, marker text UNIQUE)")

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self.stopped.is_set():
            marker = str(uuid.uuid4())
            try:
                if conn is None or conn.closed:
                    conn = pg_writer(self.deployment, connect_timeout=2, **worker.CONNECTION_TIMEOUTS)
                conn.execute(f"INSERT INTO {self.table} (marker) VALUES (%s)", (marker,))
                self.acknowledged.append(marker)
                self.acknowledged_at.append(time.monotonic())
                self.acknowledged_by.append(str(conn.info.host))
            except psycopg.Error:
                self.failed_at.append(time.monotonic())
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.1)
        if conn is not None:
            conn.close()

    def first_write_after(self, moment: float, on: str | None = None) -> float:
        """Seconds from `moment` to the first write acknowledged after it (by node `on`)."""
        address = data_ip(self.deployment, on) if on else None
        acknowledged = zip(self.acknowledged_at, self.acknowledged_by, strict=True)
        return next(t for t, host in acknowledged if t > moment and address in (None, host)) - moment

    def missing_on(self, hostname: str) -> set[str]:
        with pg(self.deployment, hostname) as conn:
            rows = conn.execute(f"SELECT marker FROM {self.table} WHERE marker = ANY(%s)", (self.acknowledged,))
            return set(self.acknowledged) - {str(m) for (m,) in rows}
