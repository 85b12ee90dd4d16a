"""Client traffic through nginx, as users send it: single requests and steady streams.

Every request carries the stack's first API token (its output `apiTokens`) unless the
caller passes another, or `token=None` for a request without one.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from types import TracebackType
from typing import Any, Protocol

from transvidio_jobs import processing

from components.topology import NGINX_HTTP_PORT, Topology
from tests.e2e.conftest import Deployment

NGINX = "127.0.0.1"
STACK_TOKEN = "stack's first token"


class Stack(Protocol):
    """What a client needs of a deployed stack: its settings and its API tokens."""

    @property
    def topology(self) -> Topology: ...

    def api_token(self, name: str | None = None) -> str: ...


def bearer(deployment: Stack, token: str | None = STACK_TOKEN) -> dict[str, str]:
    """The Authorization header for `token` (default: the stack's first API token)."""
    if token is None:
        return {}
    if token == STACK_TOKEN:
        token = deployment.api_token()
    return {"Authorization": f"Bearer {token}"}


def request(
    deployment: Stack,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
    token: str | None = STACK_TOKEN,
    host: str = NGINX,
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(host, deployment.topology.settings.nginx.http_port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers={**bearer(deployment, token), **(headers or {})})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def api(
    deployment: Stack,
    method: str,
    path: str,
    document: Any = None,
    token: str | None = STACK_TOKEN,
    host: str = NGINX,
) -> tuple[int, Any]:
    """A JSON request to the API and its decoded answer."""
    body = json.dumps(document).encode() if document is not None else None
    status, _, raw = request(
        deployment, method, path, body, {"Content-Type": "application/json"}, token=token, host=host
    )
    return status, json.loads(raw) if raw else None


def upload(deployment: Stack, data: bytes, token: str | None = STACK_TOKEN, host: str = NGINX) -> str:
    """POST /api/uploads: the new upload's id."""
    headers = {"Content-Type": "application/octet-stream"}
    status, _, raw = request(deployment, "POST", "/api/uploads", data, headers, token=token, host=host)
    assert status == 201, raw
    document = json.loads(raw)
    assert document["size"] == len(data)
    return str(document["upload_id"])


def submit(
    deployment: Stack,
    upload_id: str,
    duration: int,
    language: str,
    token: str | None = STACK_TOKEN,
    host: str = NGINX,
) -> dict[str, Any]:
    """POST /api/jobs: the accepted job."""
    document = {"upload_id": upload_id, "duration_seconds": duration, "target_language": language}
    status, job = api(deployment, "POST", "/api/jobs", document, token=token, host=host)
    assert status == 201, job
    return dict(job)


def wait_done(
    deployment: Stack, job_id: str, timeout: float = 240, token: str | None = STACK_TOKEN, host: str = NGINX
) -> dict[str, Any]:
    """The job once it succeeded or failed; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    job: Any = None
    while time.monotonic() < deadline:
        status, job = api(deployment, "GET", f"/api/jobs/{job_id}", token=token, host=host)
        assert status == 200, job
        if job["status"] in ("succeeded", "failed"):
            return dict(job)
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not done within {timeout}s: {job}")


def fetch_result(deployment: Stack, job: dict[str, Any], host: str = NGINX) -> dict[str, Any]:
    """The result through its signed link, as a browser handed the link would get it."""
    status, headers, raw = request(deployment, "GET", job["result_url"], token=None, host=host)
    assert status == 200 and headers["content-type"] == "application/json", (status, raw)
    return dict(json.loads(raw))


def check_result(result: dict[str, Any], data: bytes, job: dict[str, Any]) -> None:
    """Recomputes every segment from the uploaded bytes with the same processing code."""
    duration, language = job["duration_seconds"], job["target_language"]
    assert [s["index"] for s in result["segments"]] == list(range(duration))
    for segment in result["segments"]:
        start, end = processing.segment_bounds(len(data), duration, segment["index"])
        assert segment["digest"] == processing.reference_step([data[start:end]], segment["index"], language)["digest"]
    assert result["digest"] == processing.assemble(job["id"], language, result["segments"])["digest"]


# Run in a backend: an HTTP request to nginx from inside the cluster, printed as status + body.
_INSIDE = """
import sys, urllib.error, urllib.request
headers = {"Authorization": "Bearer " + sys.argv[2]} if len(sys.argv) > 2 else {}
try:
    request = urllib.request.Request("http://nginx:%d" + sys.argv[1], headers=headers)
    response = urllib.request.urlopen(request, timeout=20)
    status, body = response.status, response.read()
except urllib.error.HTTPError as error:
    status, body = error.code, error.read()
sys.stdout.write(str(status) + "\\n" + body.decode())
"""


def from_inside(deployment: Deployment, path: str, token: str | None = STACK_TOKEN) -> tuple[int, bytes]:
    """GET `path` through nginx from a backend container: what the cluster's own networks see."""
    tokens = [] if token is None else [deployment.api_token() if token == STACK_TOKEN else token]
    code, output = deployment.exec(
        deployment.topology.backends[0].hostname, ["python3", "-c", _INSIDE % NGINX_HTTP_PORT, path, *tokens]
    )
    assert code == 0, output
    status, _, body = output.partition("\n")
    return int(status), body.encode()


def upstream_lists(nginx_logs: str) -> list[list[str]]:
    """Each list of backend addresses nginx's entrypoint applied, in order: the one it started
    nginx with, then one at each reload."""
    return [
        line.split(" with: ", 1)[1].split()
        for line in nginx_logs.splitlines()
        if "upstreams: starting with: " in line or "upstreams: reloaded with: " in line
    ]


def applied_upstreams(nginx_logs: str) -> list[str] | None:
    """The backend addresses nginx balances over: those its entrypoint last applied, or None
    before it has. Not the upstream file: the entrypoint writes it, checks the config and only
    then signals nginx, which until then still sends requests to the servers before, on its
    kept-alive connections too."""
    applied = upstream_lists(nginx_logs)
    return applied[-1] if applied else None


class GetStream:
    """`clients` threads GETting `path` through nginx until closed; every answer other than
    `expected`, and every connection error, is a failure. Counts which backend answered.
    `hosts`: the nginx addresses to spread the clients over (a swarm's nodes)."""

    def __init__(
        self,
        deployment: Stack,
        path: str,
        expected: int,
        clients: int = 4,
        hosts: tuple[str, ...] = (NGINX,),
        timeout: float = 10,
    ) -> None:
        self.deployment, self.path, self.expected, self.hosts = deployment, path, expected, hosts
        self.timeout = timeout  # how long a client waits for each answer
        self.failures: list[str] = []
        self.failure_times: list[float] = []  # time.monotonic() of each failure
        self.slowest = 0.0  # the longest a request took, answered or not
        self.served: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._client, args=(hosts[i % len(hosts)],), daemon=True) for i in range(clients)
        ]

    def _client(self, host: str) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                status, headers, body = request(self.deployment, "GET", self.path, timeout=self.timeout, host=host)
                backend = headers.get("x-served-by", "?")
                # Which backend said what (a 503 names the dependency it could not reach).
                reason = body[:160].decode(errors="replace")
                outcome = None if status == self.expected else f"HTTP {status} via {host} from {backend}: {reason}"
            except OSError as error:
                outcome, backend = repr(error), "-"
            with self.lock:
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.served[backend] += 1
                if outcome:
                    self.failures.append(outcome)
                    self.failure_times.append(time.monotonic())
            if outcome:
                time.sleep(0.05)

    @property
    def total(self) -> int:
        with self.lock:
            return sum(self.served.values())

    def wait_answers(self, more: int, timeout: float = 120) -> None:
        """Waits until `more` further answers (of any outcome) have come: a window counted in
        requests rather than seconds, so a slow host puts as many through it as a fast one."""
        target = self.total + more
        deadline = time.monotonic() + timeout
        while (total := self.total) < target:
            assert time.monotonic() < deadline, f"{more - (target - total)} of {more} answers in {timeout:.0f}s"
            time.sleep(0.05)

    def __enter__(self) -> GetStream:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
