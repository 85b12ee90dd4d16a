"""What the security checks cost, on the prod stack (figures, not asserts).

- Requests per second of an authenticated API read (`GET /api/jobs/<id>` with a bearer
  token: the token check, the owner check, the cached job) through nginx with its
  per-client limits on, against the same request straight to one backend and against
  `GET /health`, which nginx answers itself (no token, no limit). The limits are raised
  for the load so that the figure is the cost of checking them, not the limit itself
  (one load generator is one client address).
- The memory peak (VmHWM) of the backend that processes a 500 MB upload as a one-second
  job: the upload attack of the security review.

Each load figure is the median of BENCH_RUNS runs (default 5), printed with its runs.
With BENCH_JSON=path the figures are added as JSON under "security".
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from bench import figure, record, runs_setting
from bench.load import closed_loop
from tests.e2e import traffic
from tests.e2e.conftest import Deployment, deployed

RUNS = runs_setting(5)
LOAD_SECONDS = float(os.environ.get("BENCH_LOAD_SECONDS", "8"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "8"))
# The limits as checks, not as a cap: high enough that the load is never delayed or refused.
GENEROUS = {"nginx": {"requestsPerSecond": 100000, "requestBurst": 100000, "connectionsPerClient": 65535}}


def load(deployment: Deployment, host: str, port: int, path: str, token: str) -> list[dict[str, float]]:
    """RUNS closed-loop loads from a backend container (the edge network) to host:port."""
    return [closed_loop(deployment, host, port, path, token, LOAD_SECONDS, CONCURRENCY) for _ in range(RUNS)]


def load_figures(name: str, runs: list[dict[str, float]]) -> list[dict[str, Any]]:
    return [
        figure(
            f"{name}, {CONCURRENCY} clients for {LOAD_SECONDS:g} s", "req/s", [r["requests_per_s"] for r in runs], 0
        ),
        figure("the same: p50 latency", "ms", [r["p50_ms"] for r in runs]),
        figure("the same: p99 latency", "ms", [r["p99_ms"] for r in runs]),
        figure("the same: failed requests", "", [r["failed"] for r in runs], 0),
    ]


def finished_job(deployment: Deployment) -> str:
    status, _, raw = traffic.request(deployment, "POST", "/api/uploads", b"bench" * 1000)
    assert status == 201, raw
    body = json.dumps({"upload_id": json.loads(raw)["upload_id"], "duration_seconds": 2, "target_language": "fr"})
    status, _, raw = traffic.request(deployment, "POST", "/api/jobs", body.encode())
    assert status == 201, raw
    job_id = str(json.loads(raw)["id"])
    deadline = time.monotonic() + 120
    while json.loads(traffic.request(deployment, "GET", f"/api/jobs/{job_id}")[2])["status"] != "succeeded":
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} did not finish")
        time.sleep(0.5)
    return job_id


def upload_attack(deployment: Deployment) -> dict[str, float]:
    """A 500 MB upload processed as a one-second job: its times, and the highest peak resident
    memory (VmHWM, since the backend started) of any backend afterwards."""
    settings = deployment.topology.settings
    size = settings.nginx.max_body_size_mb * 1024 * 1024
    connection = socket.create_connection(("127.0.0.1", settings.nginx.http_port), timeout=120)
    connection.sendall(
        (
            f"POST /api/uploads HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {deployment.api_token()}\r\n"
            f"Content-Length: {size}\r\nConnection: close\r\n\r\n"
        ).encode()
    )
    block = os.urandom(1024 * 1024)
    started = time.monotonic()
    for _ in range(size // len(block)):
        connection.sendall(block)
    answer = b""
    while chunk := connection.recv(65536):
        answer += chunk
    connection.close()
    upload_seconds = time.monotonic() - started
    upload_id = json.loads(answer.split(b"\r\n\r\n", 1)[1])["upload_id"]
    body = json.dumps({"upload_id": upload_id, "duration_seconds": 1, "target_language": "fr"}).encode()
    status, _, raw = traffic.request(deployment, "POST", "/api/jobs", body)
    assert status == 201, raw
    job_id = json.loads(raw)["id"]
    started = time.monotonic()
    while json.loads(traffic.request(deployment, "GET", f"/api/jobs/{job_id}")[2])["status"] not in (
        "succeeded",
        "failed",
    ):
        time.sleep(0.5)
    job_seconds = time.monotonic() - started
    peaks = []
    for backend in deployment.topology.backends:
        _, output = deployment.exec(backend.hostname, ["grep", "VmHWM", "/proc/1/status"])
        peaks.append(int(output.split()[1]) / 1024)
    return {"upload_s": upload_seconds, "job_s": job_seconds, "peak_mb": max(peaks)}


def main() -> None:
    with deployed("prod", GENEROUS, health_ticker=False) as deployment:
        topo = deployment.topology
        token = deployment.api_token()
        path = f"/api/jobs/{finished_job(deployment)}"
        figures = [
            *load_figures(
                "authenticated API read (`GET /api/jobs/<id>`: bearer token, owner check) through nginx, "
                "its per-client limits checked",
                load(deployment, str(topo.nginx.edge_ip), 8080, path, token),
            ),
            *load_figures(
                "the same read straight to one backend (no nginx)",
                load(deployment, str(topo.backends[1].edge_ip), 8000, path, token),
            ),
            *load_figures(
                "`GET /health`, answered by nginx itself (no token, no limit)",
                load(deployment, str(topo.nginx.edge_ip), 8080, "/health", ""),
            ),
        ]
        attacks = [upload_attack(deployment) for _ in range(RUNS)]
        limit = topo.settings.backend.memory_mb
        size = topo.settings.nginx.max_body_size_mb
    figures += [
        figure(
            f"a {size} MB upload processed as a 1 s job (the upload attack): the backends' highest peak RSS "
            f"after the run (limit {limit} MB)",
            "MB",
            [a["peak_mb"] for a in attacks],
            1,
        ),
        figure("the same: the upload's seconds", "s", [a["upload_s"] for a in attacks], 1),
        figure("the same: the job's seconds", "s", [a["job_s"] for a in attacks], 1),
    ]
    record("security", "What the security checks cost, prod stack", figures)


if __name__ == "__main__":
    main()
