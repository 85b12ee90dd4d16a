"""A closed-loop HTTP load, run from a backend container (inside the edge network): what the
pipeline and security benchmarks both measure requests per second and latency with."""

from __future__ import annotations

from tests.e2e.conftest import Deployment

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


def closed_loop(
    deployment: Deployment, host: str, port: int, path: str, token: str, seconds: float, concurrency: int
) -> dict[str, float]:
    """`concurrency` clients GETting `path` on host:port for `seconds` (with the bearer `token`,
    none when empty): requests per second, p50 and p99 latency, failed requests."""
    code, output = deployment.exec(
        "backend-1",
        ["python3", "-c", LOAD_SCRIPT, host, str(port), path, token, str(seconds), str(concurrency)],
    )
    if code != 0:
        raise RuntimeError(output[-2000:])
    rps, p50, p99, failures = (float(x) for x in output.split())
    return {"requests_per_s": rps, "p50_ms": p50, "p99_ms": p99, "failed": failures}
