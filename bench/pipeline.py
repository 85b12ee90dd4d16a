"""Pipeline benchmarks on the prod stack (figures, not asserts).

- The idle stack's CPU (the whole host's, no request and no job): on 2 cores, what the MPI
  ranks cannot have.
- MPI speed-up: the 120 s reference job run with mpirun on 1, 2 and 3 ranks, one rank
  per container, timed end to end on the MPI master.
- nginx: requests/s and p50/p99 latency of GET /health through nginx vs one backend
  directly (from inside the edge network), and the failed-request count through nginx
  while a backend is killed.

Each figure with its runs (bench.figure); with BENCH_JSON=path also written as JSON.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from typing import Any

from bench import MIN_RUNS_LONG, figure, record, runs_setting
from bench.load import closed_loop
from tests.e2e import chaos, traffic
from tests.e2e.conftest import Deployment, deployed

DURATION = 120
RANKS = (1, 2, 3)
REPEATS = runs_setting(3, least=MIN_RUNS_LONG)
LOAD_RUNS = runs_setting(5)
IDLE_SECONDS = 10.0
IDLE_SETTLE_SECONDS = 30
IDLE_BREAKDOWN_SECONDS = 30.0
CGROUP_CPUACCT = "/sys/fs/cgroup/cpuacct/docker"
LOAD_SECONDS = float(os.environ.get("BENCH_LOAD_SECONDS", "10"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "8"))


def upload_video(deployment: Deployment) -> str:
    port = deployment.topology.settings.nginx.http_port
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request(
        "POST",
        "/api/uploads",
        body=os.urandom(8 * 1024 * 1024),
        headers={"Authorization": f"Bearer {deployment.api_token()}"},
    )
    document = json.loads(connection.getresponse().read())
    connection.close()
    return str(document["upload_id"])


def mpi_job(deployment: Deployment, upload_id: str, ranks: int) -> float:
    """Seconds of one run of the reference job on `ranks` ranks, mpirun on the MPI master."""
    owner = deployment.topology.settings.backend.api_tokens[0]
    started = time.monotonic()
    code, output = deployment.exec(
        "mpi-master",
        [
            "mpirun",
            "--hostfile",
            "/etc/transvidio/mpi/hostfile",
            "-np",
            str(ranks),
            "-x",
            "PYTHONPATH",
            "python3",
            "-m",
            "transvidio_jobs.mpi_job",
            f"bench-{ranks}",
            "/srv/transvidio/uploads",
            owner,
            upload_id,
            str(DURATION),
            "fr",
            "/srv/transvidio/workspace",
        ],
        user="app",
    )
    seconds = time.monotonic() - started
    if code != 0:
        raise RuntimeError(f"mpirun -np {ranks} failed: {output[-2000:]}")
    print(f"MPI {DURATION} s job on {ranks} rank(s): {seconds:.2f} s", flush=True)
    return seconds


def host_busy_cores(seconds: float) -> float:
    """How many cores' worth of CPU the whole host used over `seconds` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            ticks = [int(field) for field in stat.readline().split()[1:]]
        idle = ticks[3] + ticks[4]  # idle and iowait
        return sum(ticks) - idle, sum(ticks)

    busy_before, total_before = sample()
    time.sleep(seconds)
    busy_after, total_after = sample()
    return (busy_after - busy_before) / (total_after - total_before) * (os.cpu_count() or 1)


def container_cpu_seconds(container_id: str) -> float | None:
    """The CPU seconds a container's processes used so far, its healthchecks' commands
    included (an exec joins the container's cgroup); None without cgroup v1 accounting."""
    try:
        with open(f"{CGROUP_CPUACCT}/{container_id}/cpuacct.usage") as usage:
            return int(usage.read()) / 1e9
    except OSError:
        return None


def idle_by_consumer(deployment: Deployment, seconds: float) -> None:
    """Prints where the idle stack's CPU goes: each container, and the rest of the host (the
    engine: dockerd, containerd, the shims and runc, which run every healthcheck's exec)."""
    containers = {c.name: c.id for c in deployment.client.containers.list()}
    before = {name: container_cpu_seconds(cid) for name, cid in containers.items()}
    host = host_busy_cores(seconds)
    after = {name: container_cpu_seconds(cid) for name, cid in containers.items()}
    used = {
        name: (end - start) / seconds
        for name, start in before.items()
        if start is not None and (end := after[name]) is not None
    }
    if not used:
        print(f"idle CPU by consumer: no per-container accounting under {CGROUP_CPUACCT}", flush=True)
        return
    in_containers = sum(used.values())
    by_container = ", ".join(f"{name} {cores * 100:.1f}" for name, cores in sorted(used.items(), key=lambda u: -u[1]))
    print(
        f"idle CPU by consumer over {seconds:g} s, % of a core: the host {host * 100:.1f}; the containers "
        f"{in_containers * 100:.1f} ({by_container}); the engine and the rest of the host "
        f"{(host - in_containers) * 100:.1f}",
        flush=True,
    )


def idle_stack() -> dict[str, Any]:
    """The CPU the prod stack uses with no request and no job: its loops, healthchecks and the
    engine's work for them. On 2 cores it is what the MPI ranks cannot have."""
    runs = [host_busy_cores(IDLE_SECONDS) * 100 for _ in range(LOAD_RUNS)]
    return figure(
        f"the prod stack idle (no request, no job): the host's CPU over {IDLE_SECONDS:g} s", "% of a core", runs, 1
    )


def mpi_speedup(deployment: Deployment) -> list[dict[str, Any]]:
    upload_id = upload_video(deployment)
    # Each repeat runs every rank count in turn, so a slow stretch of the host hits them all.
    repeats = [{ranks: mpi_job(deployment, upload_id, ranks) for ranks in RANKS} for _ in range(REPEATS)]
    figures = []
    for ranks in RANKS:
        seconds = [repeat[ranks] for repeat in repeats]
        figures.append(
            figure(
                f"MPI {DURATION} s reference job, {ranks} rank(s), one per container",
                "s",
                seconds,
                min_runs=MIN_RUNS_LONG,
            )
        )
        if ranks > 1:
            speedup = [repeat[1] / repeat[ranks] for repeat in repeats]
            figures.append(
                figure(
                    f"the same: speed-up of {ranks} ranks over 1 (within a repeat)",
                    "x",
                    speedup,
                    min_runs=MIN_RUNS_LONG,
                )
            )
    return figures


def load(deployment: Deployment, host: str, port: int) -> dict[str, float]:
    """A closed-loop load of `GET /health` from a backend container to host:port."""
    return closed_loop(deployment, host, port, "/health", "", LOAD_SECONDS, CONCURRENCY)


# A job no one has: a backend checks the token and answers 404, a request that crosses nginx.
MISSING_JOB = "/api/jobs/00000000-0000-4000-8000-000000000000"


def kill_under_load(deployment: Deployment) -> tuple[int, int]:
    """Requests through nginx, and how many failed, in 10 s of 4 clients GETting an API path
    while a backend is killed 2 s in."""
    victim = deployment.topology.backends[2].hostname
    with traffic.GetStream(deployment, MISSING_JOB, expected=404) as stream:
        time.sleep(2)
        before = chaos.kill9(deployment, victim)
        time.sleep(8)
    chaos.wait_restarted(deployment, victim, before)
    print(
        f"backend killed under load: {stream.total} requests through nginx, {len(stream.failures)} failed", flush=True
    )
    return stream.total, len(stream.failures)


def nginx(deployment: Deployment) -> list[dict[str, Any]]:
    topo = deployment.topology
    targets = {
        "`GET /health` answered by nginx itself": (str(topo.nginx.edge_ip), 8080),
        "`GET /health` straight to one backend": (str(topo.backends[1].edge_ip), 8000),
    }
    figures = []
    for name, (host, port) in targets.items():
        runs = [load(deployment, host, port) for _ in range(LOAD_RUNS)]
        described = f"{name}, {CONCURRENCY} clients for {LOAD_SECONDS:g} s"
        figures.append(figure(described, "req/s", [r["requests_per_s"] for r in runs], 0))
        figures.append(figure("the same: p99 latency", "ms", [r["p99_ms"] for r in runs]))
        figures.append(figure("the same: failed requests", "", [r["failed"] for r in runs], 0))
    kills = [kill_under_load(deployment) for _ in range(LOAD_RUNS)]
    figures.append(
        figure(
            "a backend `kill -9`ed under load through nginx (4 clients, an API GET, 10 s): failed requests",
            "",
            [failed for _, failed in kills],
            0,
        )
    )
    figures.append(figure("the same: requests answered in the 10 s", "", [total for total, _ in kills], 0))
    return figures


def main() -> None:
    with deployed("prod", health_ticker=False) as deployment:
        time.sleep(IDLE_SETTLE_SECONDS)  # the start's own work (first backups, elections) done
        idle = idle_stack()
        idle_by_consumer(deployment, IDLE_BREAKDOWN_SECONDS)
        figures = [idle, *mpi_speedup(deployment), *nginx(deployment)]
    record("pipeline", "MPI job and nginx, prod stack", figures)


if __name__ == "__main__":
    main()
