"""The cluster doing its job on the prod stack: uploads, jobs, MPI fan-out, failures.

Everything goes through nginx's published port, as a user's client would.
Tests run in file order; scaling comes last.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e import chaos, report, traffic
from tests.e2e.apply import wait_healthy
from tests.e2e.conftest import Deployment, deployed
from tests.e2e.traffic import GetStream, api, check_result, fetch_result, request, submit, upload, wait_done

STACK = "prod"
NGINX = "127.0.0.1"


@pytest.fixture(scope="module")
def prod() -> Iterator[Deployment]:
    with deployed(STACK) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return os.urandom(2 * 1024 * 1024)


def port(deployment: Deployment) -> int:
    return deployment.topology.settings.nginx.http_port


def readiness(deployment: Deployment) -> tuple[int, Any]:
    """/api/health through nginx, from inside the cluster (the only place that may ask)."""
    status, raw = traffic.from_inside(deployment, "/api/health")
    return status, json.loads(raw)


def test_upload_then_a_short_and_a_long_job_complete_with_checked_results(prod: Deployment, video: bytes) -> None:
    upload_id = upload(prod, video)
    short, long = submit(prod, upload_id, 30, "fr"), submit(prod, upload_id, 120, "pt-BR")
    assert (short["runner"], long["runner"]) == ("backend", "mpi")
    # Read-your-writes: the job is visible right after its creation.
    assert api(prod, "GET", f"/api/jobs/{short['id']}")[0] == 200
    short, long = wait_done(prod, short["id"]), wait_done(prod, long["id"])
    assert (short["status"], long["status"]) == ("succeeded", "succeeded")
    assert short["completions"] == 1 and long["completions"] == 1
    short_result, long_result = fetch_result(prod, short), fetch_result(prod, long)
    check_result(short_result, video, short)
    check_result(long_result, video, long)
    assert short_result["ranks"] == 1
    ranks = {s["rank"] for s in long_result["segments"]}
    hosts = {s["host"] for s in long_result["segments"]}
    assert long_result["ranks"] == len(prod.topology.mpi_nodes) and len(ranks) > 1 and len(hosts) > 1


def test_killing_a_backend_during_a_stream_of_gets_fails_no_request(prod: Deployment, video: bytes) -> None:
    job = wait_done(prod, submit(prod, upload(prod, video[:4096]), 5, "de")["id"])
    victim = prod.topology.backends[1].hostname
    with GetStream(prod, f"/api/jobs/{job['id']}", expected=200) as stream:
        stream.wait_answers(20)
        before = chaos.kill9(prod, victim)
        # From the kill until its restart, and 100 answers more: nginx meets the dead
        # backend and then the one still starting, whatever the host's speed.
        chaos.wait_restarted(prod, victim, before)
        stream.wait_answers(100)
    report.LINES.append(
        f"prod: {stream.total} GETs through nginx while {victim} was killed: {len(stream.failures)} failed"
    )
    assert stream.failures == []
    assert len(stream.served) >= 2


def test_killing_the_job_runner_mid_job_retries_it_and_completes_it_once(prod: Deployment, video: bytes) -> None:
    since = time.time()
    job = submit(prod, upload(prod, video), 300, "es")
    deadline = time.monotonic() + 60
    while api(prod, "GET", f"/api/jobs/{job['id']}")[1]["status"] != "running":
        assert time.monotonic() < deadline, "the long job never started"
        time.sleep(0.2)
    time.sleep(2)
    before = chaos.kill9(prod, "mpi-master")  # the runner is the master's main process
    chaos.wait_restarted(prod, "mpi-master", before)
    done = wait_done(prod, job["id"], timeout=300)
    outcome = (done["status"], done["attempts"], done["completions"])
    assert outcome == ("succeeded", 2, 1), (done, runner_said(prod, since))
    assert fetch_result(prod, done)["digest"]


def test_jobs_complete_while_a_replica_and_the_redis_master_are_down(prod: Deployment, video: bytes) -> None:
    upload_id = upload(prod, video[:65536])
    replica = chaos.pg_replicas(prod)[0]
    prod.client.containers.get(prod.name(replica)).stop(timeout=30)
    try:
        status, health = readiness(prod)
        assert status == 503 and f"postgres:{replica}" in health["down"]
        job = wait_done(prod, submit(prod, upload_id, 20, "it")["id"])
        assert job["status"] == "succeeded"
    finally:
        prod.client.containers.get(prod.name(replica)).start()
    wait_healthy(prod.client, prod.name(replica), timeout=120)

    master = chaos.wait_settled(prod)
    prod.client.containers.get(prod.name(master)).stop(timeout=5)
    try:
        deadline = time.monotonic() + 15
        seen_down = False
        while time.monotonic() < deadline and not seen_down:
            status, health = readiness(prod)
            seen_down = status == 503 and "redis" in health["down"]
        assert seen_down, "/api/health never reported Redis down"
        long_job = wait_done(prod, submit(prod, upload_id, 90, "nl")["id"])
        short_job = wait_done(prod, submit(prod, upload_id, 10, "nl")["id"])
        assert (long_job["status"], short_job["status"]) == ("succeeded", "succeeded")
    finally:
        prod.client.containers.get(prod.name(master)).start()
    assert chaos.wait_settled(prod) != master
    deadline = time.monotonic() + 30
    while readiness(prod)[0] != 200:
        assert time.monotonic() < deadline, readiness(prod)
        time.sleep(1)


def runner_said(deployment: Deployment, since: float) -> list[str]:
    """The MPI master's runner's log lines since `since` (its attempts, left-out nodes, errors)."""
    lines = chaos.logs(deployment, "mpi-master", since).splitlines()
    return [line[:400] for line in lines if " runner " in line]


def rank_runs_on(deployment: Deployment, hostname: str) -> bool:
    """Whether an MPI rank of a job runs in the node's container now."""
    # A pattern that does not match this very command line.
    code, _ = deployment.exec(hostname, ["bash", "-c", "grep -qs 'transvidio_jobs[.]mpi_job' /proc/[0-9]*/cmdline"])
    return code == 0


def test_a_stopped_worker_is_left_out_a_lost_rank_is_retried_and_a_hopeless_job_fails_with_its_reason(
    prod: Deployment, video: bytes
) -> None:
    worker = prod.topology.mpi_workers[-1].hostname
    upload_id = upload(prod, video[:65536])
    # A worker that is down when the job starts is left out: the job runs on the others, at
    # its first attempt.
    since = time.time()
    prod.client.containers.get(prod.name(worker)).stop(timeout=5)
    try:
        done = wait_done(prod, submit(prod, upload_id, 90, "sv")["id"])
    finally:
        prod.client.containers.get(prod.name(worker)).start()
    outcome = (done["status"], done["attempts"], done["completions"])
    assert outcome == ("succeeded", 1, 1), (done, runner_said(prod, since))
    result = fetch_result(prod, done)
    others = [n.hostname for n in prod.topology.mpi_nodes if n.hostname != worker]
    assert sorted({s["host"] for s in result["segments"]}) == sorted(others)
    assert result["ranks"] == len(others) * prod.topology.settings.mpi.slots_per_node
    wait_healthy(prod.client, prod.name(worker), timeout=120)
    # A worker lost while its rank runs fails the attempt with mpirun's own words; the job is
    # queued again after a backoff (10 s), by which time the worker is back: the retry
    # completes it, once.
    since = time.time()
    job = submit(prod, upload_id, 300, "sv")  # each rank works for 10 s or more: the kill lands mid-run
    chaos.wait_for(lambda: rank_runs_on(prod, worker), 90, f"a rank running on {worker}", interval=0.2)
    time.sleep(2)  # past the ranks' start-up: a kill during it can leave mpirun exiting 0, silent
    before = chaos.kill9(prod, worker)
    chaos.wait_logged(prod, "mpi-master", since, f"job {job['id']} failed: mpirun exited", timeout=90)
    chaos.wait_restarted(prod, worker, before)
    done = wait_done(prod, job["id"], timeout=300)
    outcome = (done["status"], done["completions"], done["error"])
    assert outcome == ("succeeded", 1, None), (done, runner_said(prod, since))
    assert done["attempts"] >= 2 and fetch_result(prod, done)["digest"]
    report.LINES.append(f"prod: job whose worker was lost mid-run: {done['status']} after {done['attempts']} attempts")
    # An upload that disappeared can never succeed: after its attempts, failed with the reason.
    upload_id = upload(prod, video[:4096])
    since = time.time()
    job = submit(prod, upload_id, 90, "sv")
    owner = prod.topology.settings.backend.api_tokens[0]
    # The MPI nodes mount the uploads read-only: a backend, which writes them, removes it.
    code, output = prod.exec(
        prod.topology.backends[0].hostname, ["rm", f"/srv/transvidio/uploads/{owner}/{upload_id}"], user="app"
    )
    assert code == 0, output
    done = wait_done(prod, job["id"])
    assert (done["status"], done["attempts"]) == ("failed", 3), (done, runner_said(prod, since))
    assert f"upload {upload_id} is missing" in done["error"]


def test_bad_requests_get_a_4xx_with_a_reason(prod: Deployment) -> None:
    connection = http.client.HTTPConnection(NGINX, port(prod), timeout=10)
    connection.putrequest("POST", "/api/uploads")
    connection.putheader("Content-Length", str(600 * 1024 * 1024))
    connection.endheaders()
    assert connection.getresponse().status == 413  # nginx answers before reading the body
    connection.close()
    status, _, raw = request(prod, "POST", "/api/jobs", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and b"malformed JSON" in raw
    cases = [
        ([], "JSON object"),
        ({"upload_id": "0" * 32, "duration_seconds": 30, "target_language": "fr"}, "does not exist"),
        ({"upload_id": "zz", "duration_seconds": 30, "target_language": "fr"}, "upload_id"),
        ({"upload_id": "0" * 32, "duration_seconds": 0, "target_language": "fr"}, "duration_seconds"),
        ({"upload_id": "0" * 32, "duration_seconds": "30", "target_language": "fr"}, "duration_seconds"),
        ({"upload_id": "0" * 32, "duration_seconds": 30, "target_language": "French!"}, "target_language"),
        ({"upload_id": "0" * 32, "duration_seconds": 30, "target_language": "fr", "x": 1}, "unknown field"),
    ]
    for document, reason in cases:
        status, answer = api(prod, "POST", "/api/jobs", document)
        assert status == 422 and reason in answer["error"], (document, answer)
    for job_id in ("00000000-0000-0000-0000-000000000000", "not-a-job"):
        status, answer = api(prod, "GET", f"/api/jobs/{job_id}")
        assert status == 404 and "no job" in answer["error"]
    status, _, _ = request(prod, "POST", "/api/uploads", b"", {"Content-Length": "0"})
    assert status == 400
