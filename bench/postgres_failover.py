"""PostgreSQL failover benchmarks on the prod stack (figures, not asserts).

Each run: a writer inserts rows through the app's connection logic (every node listed,
target_session_attrs=read-write, one connection kept as a pool would); the primary is
killed and not restarted (a host gone). Measured:
- failover: from the kill to the first write acknowledged by the new primary;
- acknowledged writes missing on the new primary (synchronous on: must be 0);
then the old node is started again and rejoins as a replica before the next run.
With postgres.synchronous on (prod) and off, and on with the fence off (failoverDetectSeconds
0: Patroni's TTL alone). Also write throughput (pgbench, 4 clients)
with synchronous on and off. Each figure with its runs (bench.figure); BENCH_JSON as there.
"""

from __future__ import annotations

from typing import Any

from bench import figure, record, runs_setting
from bench.data_tier import pgbench, tps
from tests.e2e import chaos
from tests.e2e.apply import wait_healthy
from tests.e2e.conftest import Deployment, deployed

RUNS = runs_setting(5)


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
    wait_healthy(deployment.client, deployment.name(old), timeout=300, check_now=True)
    chaos.wait_streaming(deployment, len(deployment.topology.postgres_replicas), timeout=180)
    return {"failover_s": failover, "lost_writes": missing}


def write_tps(deployment: Deployment) -> list[float]:
    primary = chaos.pg_primary(deployment)
    pgbench(deployment, primary, "-i", "-s", "5", "-q")
    return [tps(pgbench(deployment, primary, "-c", "4", "-j", "2", "-T", "6")) for _ in range(RUNS)]


def failovers(described: str, synchronous: bool, detect_seconds: int | None = None) -> list[dict[str, Any]]:
    """RUNS failovers with postgres.synchronous and postgres.failoverDetectSeconds (None: the default)."""
    postgres: dict[str, Any] = {"synchronous": synchronous}
    if detect_seconds is not None:
        postgres["failoverDetectSeconds"] = detect_seconds
    with deployed("prod", {"postgres": postgres}, health_ticker=False) as deployment:
        throughput = write_tps(deployment)
        runs = [one_failover(deployment) for _ in range(RUNS)]
    detect = deployment.topology.settings.postgres.failover_detect_seconds
    name = f"`synchronous: {str(synchronous).lower()}`, `failoverDetectSeconds: {detect}`{described}"
    return [
        figure(
            f"PostgreSQL primary killed, not restarted → first write on the new primary, {name}",
            "s",
            [r["failover_s"] for r in runs],
            1,
        ),
        figure("the same: acknowledged writes missing on the new primary", "", [r["lost_writes"] for r in runs], 0),
        figure(f"pgbench writes (4 clients, 6 s), {name}", "tps", throughput, 0),
    ]


def main() -> None:
    figures = [
        *failovers(" (prod)", synchronous=True),
        *failovers("", synchronous=False),
        # Without the fence: Patroni's own TTL decides (the figure before leader-fence.sh).
        *failovers(" (the fence off: Patroni's TTL alone)", synchronous=True, detect_seconds=0),
    ]
    record("postgres_failover", "PostgreSQL failover, prod stack", figures)


if __name__ == "__main__":
    main()
