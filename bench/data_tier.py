"""Data-tier benchmarks on the prod stack's own containers (figures, not asserts).

- Redis: kill -9 of the master's container to the first acknowledged write through the
  Sentinel client, with the prod settings and with tight settings; and the same for a
  master cut off the network (no restart, so the Sentinels must detect it).
- PostgreSQL: replay lag on each replica while pgbench writes on the primary; pgbench
  read-only throughput on one replica vs the primary.

Prints a table; with BENCH_JSON=path also writes the figures as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from typing import Any

import redis

from components.topology import REDIS_MASTER_NAME
from tests.e2e import chaos
from tests.e2e.conftest import Deployment, deployed

RUNS = int(os.environ.get("BENCH_RUNS", "5"))
TIGHT = {"redis": {"downAfterMs": 1000, "failoverTimeoutMs": 3000}}
RETRYABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ResponseError,
)


def first_write_after(deployment: Deployment, fault: str) -> float:
    """Seconds from the fault on the current master to the first acknowledged write."""
    chaos.wait_settled(deployment)
    master = chaos.current_master(deployment)
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
    return elapsed


def failover(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    with deployed("prod", overrides, health_ticker=False) as deployment:
        r = deployment.topology.settings.redis
        result: dict[str, Any] = {
            "settings": {
                "downAfterMs": r.down_after_ms,
                "failoverTimeoutMs": r.failover_timeout_ms,
                "sentinels": r.sentinel_count,
                "quorum": r.quorum,
            },
        }
        for fault in ("kill", "partition"):
            times = [first_write_after(deployment, fault) for _ in range(RUNS)]
            result[fault] = {
                "median_s": round(statistics.median(times), 2),
                "max_s": round(max(times), 2),
                "runs": [round(t, 2) for t in times],
            }
            print(
                f"redis failover, {name}, {fault}: median {result[fault]['median_s']} s, "
                f"max {result[fault]['max_s']} s",
                flush=True,
            )
        return result


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


def postgres() -> dict[str, Any]:
    with deployed("prod", health_ticker=False) as deployment:
        pgbench(deployment, "postgres-primary", "-i", "-s", "10", "-q")
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
                    for name, lag in rows:
                        samples.setdefault(name, []).append(lag * 1000)
                    time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        write = pgbench(deployment, "postgres-primary", "-c", "4", "-j", "2", "-T", "20")
        stop.set()
        sampler.join()
        lag = {
            name: {
                "median_ms": round(statistics.median(v), 2),
                "p99_ms": round(statistics.quantiles(v, n=100)[98], 2),
                "samples": len(v),
            }
            for name, v in samples.items()
            if len(v) > 2
        }
        replica = deployment.topology.postgres_replicas[0].hostname
        reads = {
            "primary_tps": tps(pgbench(deployment, "postgres-primary", "-S", "-c", "4", "-j", "2", "-T", "10")),
            "replica_tps": tps(pgbench(deployment, replica, "-S", "-c", "4", "-j", "2", "-T", "10")),
        }
        result = {"write_tps": tps(write), "replay_lag": lag, "read_only": reads}
        for name, figures in lag.items():
            print(
                f"postgres replay lag {name}: median {figures['median_ms']} ms, p99 {figures['p99_ms']} ms "
                f"({figures['samples']} samples at {result['write_tps']:.0f} write tps)",
                flush=True,
            )
        print(
            f"postgres read-only tps: primary {reads['primary_tps']:.0f}, replica {reads['replica_tps']:.0f}",
            flush=True,
        )
        return result


def main() -> None:
    machine = {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    redis_failover = {"prod settings": failover("prod settings", {}), "tight settings": failover("tight", TIGHT)}
    pg = postgres()
    figures: dict[str, Any] = {"machine": machine, "redis_failover": redis_failover, "postgres": pg}
    print("\n| figure | value |\n|---|---|")
    for name, result in redis_failover.items():
        for fault in ("kill", "partition"):
            print(
                f"| Redis failover, {name} ({fault}) | median {result[fault]['median_s']} s, "
                f"max {result[fault]['max_s']} s |"
            )
    for name, lag in pg["replay_lag"].items():
        print(
            f"| PostgreSQL replay lag {name} under pgbench writes | median {lag['median_ms']} ms, "
            f"p99 {lag['p99_ms']} ms |"
        )
    print(
        f"| pgbench -S tps, primary vs one replica | {pg['read_only']['primary_tps']:.0f} vs "
        f"{pg['read_only']['replica_tps']:.0f} |"
    )
    if os.environ.get("BENCH_JSON"):
        with open(os.environ["BENCH_JSON"], "w") as out:
            json.dump(figures, out, indent=2, sort_keys=True)


if __name__ == "__main__":
    main()
