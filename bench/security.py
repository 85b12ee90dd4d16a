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
import statistics
import time
from typing import Any

from bench import add_to_bench_json
from tests.e2e import traffic
from tests.e2e.conftest import Deployment, deployed

RUNS = int(os.environ.get("BENCH_RUNS", "5"))
LOAD_SECONDS = float(os.environ.get("BENCH_LOAD_SECONDS", "8"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "8"))
# The limits as checks, not as a cap: high enough that the load is never delayed or refused.
GENEROUS = {"nginx": {"requestsPerSecond": 100000, "requestBurst": 100000, "connectionsPerClient": 65535}}

LOAD_SCRIPT = """
import http.client, sys, threading, time
host, port, path, token, seconds, concurrency = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], \\
    float(sys.argv[5]), int(sys.argv[6])
headers = {"Authorization": "Bearer " + token} if token else {}
latencies, failures = [], [0]
def client():
    connection = http.client.HTTPConnection(host, port, timeout=10)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        try:
            connection.request("GET", path, headers=headers)
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


def load(deployment: Deployment, host: str, port: int, path: str, token: str) -> dict[str, Any]:
    """RUNS closed-loop loads from a backend container (the edge network) to host:port."""
    runs = []
    for _ in range(RUNS):
        code, output = deployment.exec(
            "backend-1",
            ["python3", "-c", LOAD_SCRIPT, host, str(port), path, token, str(LOAD_SECONDS), str(CONCURRENCY)],
        )
        if code != 0:
            raise RuntimeError(output[-2000:])
        rps, p50, p99, failures = (float(x) for x in output.split())
        runs.append(
            {"requests_per_s": round(rps), "p50_ms": round(p50, 2), "p99_ms": round(p99, 2), "failed": failures}
        )
    rates = [r["requests_per_s"] for r in runs]
    return {
        "median_requests_per_s": statistics.median(rates),
        "min_requests_per_s": min(rates),
        "max_requests_per_s": max(rates),
        "median_p50_ms": statistics.median(r["p50_ms"] for r in runs),
        "median_p99_ms": statistics.median(r["p99_ms"] for r in runs),
        "failed": sum(r["failed"] for r in runs),
        "runs": runs,
    }


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


def upload_attack(deployment: Deployment) -> dict[str, Any]:
    """A 500 MB upload processed as a one-second job; the backends' peak resident memory."""
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
    peaks = {}
    for backend in deployment.topology.backends:
        _, output = deployment.exec(backend.hostname, ["grep", "VmHWM", "/proc/1/status"])
        peaks[backend.hostname] = round(int(output.split()[1]) / 1024, 1)
    return {
        "upload_mb": size >> 20,
        "upload_seconds": round(upload_seconds, 1),
        "job_seconds": round(job_seconds, 1),
        "backend_peak_rss_mb": peaks,
        "backend_memory_limit_mb": settings.backend.memory_mb,
    }


def main() -> None:
    with deployed("prod", GENEROUS, health_ticker=False) as deployment:
        topo = deployment.topology
        token = deployment.api_token()
        path = f"/api/jobs/{finished_job(deployment)}"
        figures: dict[str, Any] = {
            "api_read_through_nginx": load(deployment, str(topo.nginx.edge_ip), 8080, path, token),
            "api_read_one_backend": load(deployment, str(topo.backends[1].edge_ip), 8000, path, token),
            "health_by_nginx_itself": load(deployment, str(topo.nginx.edge_ip), 8080, "/health", ""),
            "upload_attack": upload_attack(deployment),
        }
    print("\n| figure | value |\n|---|---|")
    for name in ("api_read_through_nginx", "api_read_one_backend", "health_by_nginx_itself"):
        f = figures[name]
        print(
            f"| {name.replace('_', ' ')} | median {f['median_requests_per_s']} req/s "
            f"(min {f['min_requests_per_s']}, max {f['max_requests_per_s']}, {RUNS} runs), "
            f"p50 {f['median_p50_ms']} ms, p99 {f['median_p99_ms']} ms, {f['failed']} failed |"
        )
    attack = figures["upload_attack"]
    print(
        f"| {attack['upload_mb']} MB upload as a 1 s job | backend peak RSS {attack['backend_peak_rss_mb']} MB "
        f"(limit {attack['backend_memory_limit_mb']} MB); upload {attack['upload_seconds']} s, "
        f"job {attack['job_seconds']} s |"
    )
    add_to_bench_json("security", figures)


if __name__ == "__main__":
    main()
