"""Pipeline benchmarks on the prod stack (figures, not asserts).

- MPI speed-up: the 120 s reference job run with mpirun on 1, 2 and 3 ranks, one rank
  per container, timed end to end on the MPI master.
- nginx: requests/s and p50/p99 latency of GET /health through nginx vs one backend
  directly (from inside the edge network), and the failed-request count through nginx
  while a backend is killed.

Prints a table; with BENCH_JSON=path also writes the figures as JSON.
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import threading
import time
from typing import Any

from bench import add_to_bench_json
from tests.e2e import chaos
from tests.e2e.conftest import Deployment, deployed

DURATION = 120
RANKS = (1, 2, 3)
REPEATS = int(os.environ.get("BENCH_RUNS", "3"))
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


def mpi_speedup(deployment: Deployment) -> dict[str, Any]:
    upload_id = upload_video(deployment)
    owner = deployment.topology.settings.backend.api_tokens[0]
    seconds: dict[int, float] = {}
    for ranks in RANKS:
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
        seconds[ranks] = time.monotonic() - started
        if code != 0:
            raise RuntimeError(f"mpirun -np {ranks} failed: {output[-2000:]}")
        print(f"MPI {DURATION} s job on {ranks} rank(s): {seconds[ranks]:.2f} s", flush=True)
    return {
        "seconds": {str(r): round(s, 2) for r, s in seconds.items()},
        "speedup": {str(r): round(seconds[1] / s, 2) for r, s in seconds.items()},
    }


LOAD_SCRIPT = """
import http.client, sys, threading, time
host, port, seconds, concurrency = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
latencies, failures = [], [0]
def client():
    connection = http.client.HTTPConnection(host, port, timeout=10)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        try:
            connection.request("GET", "/health")
            response = connection.getresponse(); response.read()
            if response.status != 200: failures[0] += 1
        except OSError:
            failures[0] += 1
            connection = http.client.HTTPConnection(host, port, timeout=10)
        latencies.append(time.monotonic() - started)
threads = [threading.Thread(target=client) for _ in range(concurrency)]
[t.start() for t in threads]; [t.join() for t in threads]
latencies.sort()
print(len(latencies) / seconds, latencies[len(latencies) // 2] * 1000, latencies[int(len(latencies) * 0.99)] * 1000,
      failures[0])
"""


def load(deployment: Deployment, host: str, port: int) -> dict[str, float]:
    """A closed-loop load from a backend container (inside the edge network) to host:port."""
    code, output = deployment.exec(
        "backend-1", ["python3", "-c", LOAD_SCRIPT, host, str(port), str(LOAD_SECONDS), str(CONCURRENCY)]
    )
    if code != 0:
        raise RuntimeError(output[-2000:])
    rps, p50, p99, failures = (float(x) for x in output.split())
    return {"requests_per_s": round(rps), "p50_ms": round(p50, 2), "p99_ms": round(p99, 2), "failed": failures}


def nginx(deployment: Deployment) -> dict[str, Any]:
    topo = deployment.topology
    through = load(deployment, str(topo.nginx.edge_ip), 8080)
    direct = load(deployment, str(topo.backends[1].edge_ip), 8000)
    print(f"GET /health through nginx: {through}", flush=True)
    print(f"GET /health on one backend: {direct}", flush=True)
    failures: list[str] = []
    count = [0]
    stop = threading.Event()
    port = topo.settings.nginx.http_port

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while not stop.is_set():
            try:
                connection.request("GET", "/health")
                response = connection.getresponse()
                response.read()
                count[0] += 1
                if response.status != 200:
                    failures.append(str(response.status))
            except OSError as error:
                failures.append(repr(error))
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    victim = topo.backends[2].hostname
    before = chaos.kill9(deployment, victim)
    time.sleep(8)
    stop.set()
    for thread in threads:
        thread.join()
    chaos.wait_restarted(deployment, victim, before)
    print(f"backend killed under load: {count[0]} requests through nginx, {len(failures)} failed", flush=True)
    return {
        "through_nginx": through,
        "one_backend": direct,
        "kill_under_load": {"requests": count[0], "failed": len(failures)},
    }


def main() -> None:
    with deployed("prod", health_ticker=False) as deployment:
        figures: dict[str, Any] = {
            "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
            "mpi": mpi_speedup(deployment),
            "nginx": nginx(deployment),
        }
    mpi, ngx = figures["mpi"], figures["nginx"]
    print("\n| figure | value |\n|---|---|")
    for ranks in RANKS:
        print(
            f"| MPI {DURATION} s job, {ranks} rank(s) | {mpi['seconds'][str(ranks)]} s "
            f"(speed-up {mpi['speedup'][str(ranks)]}x) |"
        )
    for name in ("through_nginx", "one_backend"):
        f = ngx[name]
        print(
            f"| GET /health {name.replace('_', ' ')} | {f['requests_per_s']} req/s, p50 {f['p50_ms']} ms, "
            f"p99 {f['p99_ms']} ms |"
        )
    print(
        f"| backend killed under load | {ngx['kill_under_load']['failed']} of "
        f"{ngx['kill_under_load']['requests']} requests failed |"
    )
    print(f"(machine {figures['machine']})")
    add_to_bench_json("pipeline", figures)


if __name__ == "__main__":
    main()
