"""Data-tier benchmarks on the prod stack's own containers (figures, not asserts).

- Redis: kill -9 of the master's container to the first acknowledged write through the
  Sentinel client, with the prod settings and with tight settings; and the same for a
  master cut off the network (no restart, so the Sentinels must detect it).
- PostgreSQL: replay lag on each replica while pgbench writes on the primary; pgbench
  read-only throughput on one replica vs the primary.

Each figure with its runs (bench.figure); with BENCH_JSON=path also written as JSON.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import redis

from bench import figure, record, runs_setting
from components.topology import REDIS_MASTER_NAME
from tests.e2e import chaos
from tests.e2e.apply import seconds_running
from tests.e2e.conftest import Deployment, deployed

KILL_RUNS = runs_setting(10)  # the tail is the point: the goal is a max over 10 runs
CUT_RUNS = runs_setting(5)
PG_RUNS = runs_setting(5)
PGBENCH_SECONDS = 8
TIGHT = {"redis": {"downAfterMs": 1000, "failoverTimeoutMs": 3000}}
# Docker's restart manager doubles a container's restart delay (100 ms, 200 ms, … up to a
# minute) each time it exits within 10 s of its start, and resets it after a run of 10 s.
ENGINE_BACKOFF_RESET_SECONDS = 10
RETRYABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ResponseError,
)


def wait_past_restart_backoff(deployment: Deployment, hostname: str) -> None:
    """Until the container has run long enough for the engine to restart it after 100 ms.

    Each run kills whichever node is master, and a node killed a few runs before can be
    master again within 10 s of its restart: the engine would then restart it later each
    time, and the figure would measure a crash loop's backoff, not one crash."""
    state = deployment.client.api.inspect_container(deployment.name(hostname))["State"]
    remaining = ENGINE_BACKOFF_RESET_SECONDS + 1 - seconds_running(state)
    if remaining > 0:
        time.sleep(remaining)


def first_write_after(deployment: Deployment, fault: str) -> float:
    """Seconds from the fault on the current master to the first acknowledged write."""
    chaos.wait_settled(deployment)
    master = chaos.current_master(deployment)
    if fault == "kill":
        wait_past_restart_backoff(deployment, master)
    client = chaos.sentinel_client(deployment).master_for(  # type: ignore[no-untyped-call]
        REDIS_MASTER_NAME, socket_timeout=0.5
    )
    client.set("bench:warm", "1")
    before = ""
    started = time.monotonic()
    if fault == "kill":
        before = chaos.kill9(deployment, master)
    else:
        chaos.disconnect(deployment, master)
    try:
        while True:
            try:
                client.set("bench:after", "1")
                elapsed = time.monotonic() - started
                break
            except RETRYABLE:
                if time.monotonic() - started > 120:
                    raise
                time.sleep(0.02)
    finally:
        if fault == "partition":
            chaos.reconnect(deployment, master)
    if fault == "kill":
        chaos.wait_restarted(deployment, master, before)
    chaos.wait_settled(deployment)
    print(f"redis {fault}: first acknowledged write after {elapsed:.2f} s", flush=True)
    return elapsed


def failover(name: str, overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """The kill and the network-cut failovers, each run KILL_RUNS / CUT_RUNS times."""
    with deployed("prod", overrides, health_ticker=False) as deployment:
        r = deployment.topology.settings.redis
        described = f"{name}: down-after {r.down_after_ms} ms, failover-timeout {r.failover_timeout_ms} ms"
        kills = [first_write_after(deployment, "kill") for _ in range(KILL_RUNS)]
        cuts = [first_write_after(deployment, "partition") for _ in range(CUT_RUNS)]
    return [
        figure(f"Redis master `kill -9` → first acknowledged write, {described}", "s", kills),
        figure(f"Redis master cut off the network → first acknowledged write, {described}", "s", cuts),
    ]


def pgbench(deployment: Deployment, hostname: str, *args: str) -> str:
    code, output = deployment.exec(
        hostname,
        [
            "bash",
            "-c",
            'exec "$(find /usr/lib/postgresql -name pgbench -type f | sort -V | tail -n 1)" "$@"',
            "pgbench",
            "-h",
            "/var/lib/postgresql/run",
            "-U",
            "postgres",
            *args,
            "transvidio",
        ],
    )
    if code != 0:
        raise RuntimeError(f"pgbench on {hostname} failed: {output[-2000:]}")
    return output


def tps(output: str) -> float:
    line = next(line for line in output.splitlines() if line.startswith("tps ="))
    return float(line.split()[2])


def replay_lags(deployment: Deployment, seconds: int) -> tuple[dict[str, list[float]], float]:
    """Replay lag samples (ms) of each replica every 100 ms while pgbench writes for `seconds`,
    and pgbench's write tps."""
    # Patroni's standbys report their member name (the hostname) as application_name.
    samples: dict[str, list[float]] = {r.hostname: [] for r in deployment.topology.postgres_replicas}
    stop = threading.Event()

    def sample() -> None:
        with chaos.pg_writer(deployment) as conn:
            while not stop.is_set():
                rows = conn.execute(
                    "SELECT application_name, EXTRACT(EPOCH FROM COALESCE(replay_lag, '0'))::float "
                    "FROM pg_stat_replication"
                ).fetchall()
                for replica, lag in rows:
                    samples.setdefault(replica, []).append(lag * 1000)
                time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        write = pgbench(deployment, "postgres-primary", "-c", "4", "-j", "2", "-T", str(seconds))
    finally:
        stop.set()
        sampler.join()
    return samples, tps(write)


def postgres() -> list[dict[str, Any]]:
    with deployed("prod", health_ticker=False) as deployment:
        pgbench(deployment, "postgres-primary", "-i", "-s", "10", "-q")
        replicas = [r.hostname for r in deployment.topology.postgres_replicas]
        medians: dict[str, list[float]] = {name: [] for name in replicas}
        p99s: dict[str, list[float]] = {name: [] for name in replicas}
        writes = []
        for _ in range(PG_RUNS):
            samples, write_tps = replay_lags(deployment, PGBENCH_SECONDS)
            writes.append(write_tps)
            for name in replicas:
                medians[name].append(statistics.median(samples[name]))
                p99s[name].append(statistics.quantiles(samples[name], n=100)[98])
        read_only = {
            host: [
                tps(pgbench(deployment, host, "-S", "-c", "4", "-j", "2", "-T", str(PGBENCH_SECONDS)))
                for _ in range(PG_RUNS)
            ]
            for host in ("postgres-primary", replicas[0])
        }
    figures = [figure("PostgreSQL pgbench writes (4 clients) while the lag is sampled", "tps", writes, 0)]
    for name in replicas:
        lag = f"PostgreSQL replay lag of {name} under those writes"
        figures.append(figure(f"{lag}: a run's median", "ms", medians[name]))
        figures.append(figure(f"{lag}: a run's 99th percentile", "ms", p99s[name]))
    for host, runs in read_only.items():
        figures.append(figure(f"pgbench `-S` (read-only, 4 clients) on {host}", "tps", runs, 0))
    return figures


def main() -> None:
    figures = [*failover("prod settings", {}), *failover("tight settings", TIGHT), *postgres()]
    record("data_tier", "Redis failover and PostgreSQL replication, prod stack", figures)


if __name__ == "__main__":
    main()
