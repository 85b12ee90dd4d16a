"""PostgreSQL failover benchmarks on the prod stack (figures, not asserts).

Each run: a writer inserts rows through the app's connection logic (every node listed,
target_session_attrs=read-write, one connection kept as a pool would); the primary is
killed and not restarted (a host gone). Measured:
- failover: from the kill to the first write acknowledged by the new primary;
- acknowledged writes missing on the new primary (synchronous on: must be 0);
then the old node is started again and rejoins as a replica before the next run.
With postgres.synchronous on (prod) and off, and on with the fence off (failoverDetectSeconds
0: Patroni's TTL alone). Also write throughput (pgbench, 4 clients)
with synchronous on and off. Prints a table; with BENCH_JSON=path also writes JSON.
"""

from __future__ import annotations

import os
import platform
import statistics
from typing import Any

from bench import add_to_bench_json
from bench.data_tier import pgbench, tps
from tests.e2e import chaos
from tests.e2e.apply import wait_healthy
from tests.e2e.conftest import Deployment, deployed

RUNS = int(os.environ.get("BENCH_RUNS", "5"))


def one_failover(deployment: Deployment) -> dict[str, float]:
    old = chaos.wait_pg_settled(deployment)
    with chaos.Writer(deployment, table="bench_failover") as writer:
        chaos.wait_more_writes(writer.acknowledged, 50)
        killed = chaos.lose_for_good(deployment, old)
        new = chaos.pg_primary(deployment, timeout=120, other_than=old)
        chaos.wait_more_writes(writer.acknowledged, 20)
    failover = writer.first_write_after(killed, on=new)
    missing = len(writer.missing_on(new))
    chaos.bring_back(deployment, old)
    wait_healthy(deployment.client, deployment.name(old), timeout=300)
    chaos.wait_streaming(deployment, len(deployment.topology.postgres_replicas), timeout=180)
    return {"failover_s": failover, "lost_writes": missing}


def write_tps(deployment: Deployment) -> float:
    primary = chaos.pg_primary(deployment)
    pgbench(deployment, primary, "-i", "-s", "5", "-q")
    return tps(pgbench(deployment, primary, "-c", "4", "-j", "2", "-T", "15"))


def failovers(synchronous: bool, detect_seconds: int | None = None) -> dict[str, Any]:
    """RUNS failovers with postgres.synchronous and postgres.failoverDetectSeconds (None: the default)."""
    postgres: dict[str, Any] = {"synchronous": synchronous}
    if detect_seconds is not None:
        postgres["failoverDetectSeconds"] = detect_seconds
    with deployed("prod", {"postgres": postgres}, health_ticker=False) as deployment:
        throughput = write_tps(deployment)
        runs = [one_failover(deployment) for _ in range(RUNS)]
    seconds = [round(r["failover_s"], 1) for r in runs]
    result = {
        "synchronous": synchronous,
        "failover_detect_seconds": deployment.topology.settings.postgres.failover_detect_seconds,
        "runs": seconds,
        "failover_median_s": round(statistics.median(seconds), 1),
        "failover_min_s": min(seconds),
        "failover_max_s": max(seconds),
        "acknowledged_writes_lost": sum(int(r["lost_writes"]) for r in runs),
        "write_tps": round(throughput),
    }
    print(f"postgres failover (synchronous {synchronous}, detect {detect_seconds}): {result}", flush=True)
    return result


def main() -> None:
    machine = {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    figures: dict[str, Any] = {"machine": machine}
    figures["postgres_failover"] = {
        "synchronous": failovers(synchronous=True),
        "asynchronous": failovers(synchronous=False),
        # Without the fence: Patroni's own TTL decides (the figure before leader-fence.sh).
        "synchronous_ttl_only": failovers(synchronous=True, detect_seconds=0),
    }
    print("\n| figure | value |\n|---|---|")
    for name, result in figures["postgres_failover"].items():
        print(
            f"| PostgreSQL primary killed, not restarted → first write on the new primary, {name} "
            f"| median {result['failover_median_s']} s, min {result['failover_min_s']} s, "
            f"max {result['failover_max_s']} s ({result['runs']}); acknowledged writes lost: "
            f"{result['acknowledged_writes_lost']} |"
        )
        print(f"| pgbench write throughput (4 clients), {name} | {result['write_tps']} tps |")
    print(f"(machine {figures['machine']})")
    add_to_bench_json("postgres_failover", figures)


if __name__ == "__main__":
    main()
