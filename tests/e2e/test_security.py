"""The prod stack against hostile clients and a compromised container, for real.

Each test makes one attack through nginx's published port (or from inside a container,
for what a compromised one could try) and asserts what stops it: a token, an owner, a
size, time or rate bound, a Redis ACL, a read-only mount, a pinned SSH key, validation
in the job runner. The last test rotates every password by config and checks that the
new one works and the old one is refused, everywhere it is used.

The stack is prod with a second API token (`mallory`, the other client) and a small cap
on active jobs per token, so that the cap can be reached quickly.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis

from components import render
from components.topology import REDIS_MASTER_NAME
from tests.e2e import chaos, report
from tests.e2e.conftest import Deployment, deployed
from tests.e2e.traffic import request, upload, wait_done
from tests.program import plain

STACK = "prod"
OTHER = "mallory"
ACTIVE_JOBS = 2
LONG_JOB = 90  # seconds of video: past the backend's MPI threshold (60 s)
OVERRIDES = {"backend": {"apiTokens": ["default", OTHER], "maxActiveJobsPerToken": ACTIVE_JOBS}}


@pytest.fixture(scope="module")
def prod() -> Iterator[Deployment]:
    with deployed(STACK, OVERRIDES) as deployment:
        yield deployment


def job_body(upload_id: str, duration: int = 5) -> bytes:
    return json.dumps({"upload_id": upload_id, "duration_seconds": duration, "target_language": "fr"}).encode()


# --- who may ask --------------------------------------------------------------------------


def test_no_token_or_a_wrong_one_is_a_401_on_every_api_route(prod: Deployment) -> None:
    routes = [
        ("POST", "/api/uploads"),
        ("POST", "/api/jobs"),
        ("GET", f"/api/jobs/{uuid.uuid4()}"),
        ("GET", f"/api/jobs/{uuid.uuid4()}/result"),
    ]
    for method, path in routes:
        for token in (None, "not-a-token", prod.api_token() + "x"):
            status, headers, raw = request(prod, method, path, b"{}", token=token)
            assert status == 401, (method, path, token, raw)
            assert headers["www-authenticate"].startswith("Bearer"), (method, path)
            assert "token" in json.loads(raw)["error"]
    status, _, _ = request(prod, "GET", "/health", token=None)  # liveness needs none
    assert status == 200


def test_another_tokens_upload_job_and_result_do_not_exist_for_it(prod: Deployment) -> None:
    mine = upload(prod, b"my video" * 512)
    status, _, raw = request(prod, "POST", "/api/jobs", job_body(mine), token=prod.api_token(OTHER))
    assert (status, json.loads(raw)["error"]) == (422, f"upload {mine} does not exist")
    status, _, raw = request(prod, "POST", "/api/jobs", job_body(mine))
    assert status == 201, raw
    job = wait_done(prod, json.loads(raw)["id"])
    assert job["status"] == "succeeded" and job["owner"] == "default"
    for path in (f"/api/jobs/{job['id']}", f"/api/jobs/{job['id']}/result"):
        status, _, raw = request(prod, "GET", path, token=prod.api_token(OTHER))
        assert (status, json.loads(raw)) == (404, {"error": f"no job {job['id']}"}), path


def test_a_result_is_served_only_to_its_token_or_through_its_signed_link(prod: Deployment) -> None:
    status, _, raw = request(prod, "POST", "/api/jobs", job_body(upload(prod, b"frames" * 1000)))
    assert status == 201, raw
    job = wait_done(prod, json.loads(raw)["id"])
    path = f"/api/jobs/{job['id']}/result"
    status, headers, body = request(prod, "GET", path)
    assert status == 200 and json.loads(body)["job_id"] == job["id"]
    assert "x-accel-redirect" not in headers  # nginx consumed it and sent the file
    status, _, linked = request(prod, "GET", job["result_url"], token=None)
    assert (status, linked) == (200, body)
    tampered = job["result_url"].replace("signature=", "signature=0")
    status, _, raw = request(prod, "GET", tampered, token=None)
    assert status == 403 and "not valid" in json.loads(raw)["error"]
    # The volume itself is not served: neither the old public path nor the internal one.
    for direct in (f"/outputs/{job['id']}/result.json", f"{render.OUTPUTS_INTERNAL_PREFIX}{job['id']}/result.json"):
        status, headers, raw = request(prod, "GET", direct)
        assert status == 404 and json.loads(raw) == {"error": "not found"}, direct
        assert headers["content-type"] == "application/json"


# --- how much a client may ask ------------------------------------------------------------------


def test_a_token_over_its_active_jobs_cap_gets_a_429_and_the_other_token_does_not(prod: Deployment) -> None:
    other = prod.api_token(OTHER)
    upload_id = upload(prod, b"queued" * 100, token=other)
    accepted = []
    # Long jobs (over a minute of video: the MPI cluster's), which are still queued or running
    # when the next one is asked for, and short enough to be done well within wait_done.
    for _ in range(ACTIVE_JOBS):
        status, _, raw = request(prod, "POST", "/api/jobs", job_body(upload_id, LONG_JOB), token=other)
        assert status == 201, raw
        accepted.append(json.loads(raw)["id"])
    status, _, raw = request(prod, "POST", "/api/jobs", job_body(upload_id, LONG_JOB), token=other)
    assert (status, json.loads(raw)["error"]) == (
        429,
        f"token {OTHER} already has {ACTIVE_JOBS} jobs queued or running (maxActiveJobsPerToken)",
    )
    status, _, raw = request(prod, "POST", "/api/jobs", job_body(upload(prod, b"mine"), 5))
    assert status == 201, raw  # the default token's count is its own
    for job_id in accepted:  # and once they are done, the cap frees up
        assert wait_done(prod, job_id, token=other)["status"] == "succeeded"
    status, _, raw = request(prod, "POST", "/api/jobs", job_body(upload_id, 5), token=other)
    assert status == 201, raw


def test_a_500_mb_upload_processed_as_a_one_second_job_stays_far_below_the_memory_limit(prod: Deployment) -> None:
    size = prod.topology.settings.nginx.max_body_size_mb * 1024 * 1024
    connection = socket.create_connection(("127.0.0.1", prod.topology.settings.nginx.http_port), timeout=60)
    head = (
        f"POST /api/uploads HTTP/1.1\r\nHost: e2e\r\nAuthorization: Bearer {prod.api_token()}\r\n"
        f"Content-Length: {size}\r\nConnection: close\r\n\r\n"
    )
    connection.sendall(head.encode())
    block = bytes(range(256)) * 4096  # 1 MiB
    for _ in range(size // len(block)):
        connection.sendall(block)
    answer = b""
    while chunk := connection.recv(65536):
        answer += chunk
    connection.close()
    assert answer.startswith(b"HTTP/1.1 201"), answer[:300]
    upload_id = json.loads(answer.split(b"\r\n\r\n", 1)[1])["upload_id"]
    before = {b.hostname: backend_restarts(prod, b.hostname) for b in prod.topology.backends}
    status, _, raw = request(prod, "POST", "/api/jobs", job_body(upload_id, 1))
    assert status == 201 and json.loads(raw)["runner"] == "backend", raw
    job = wait_done(prod, json.loads(raw)["id"])
    assert job["status"] == "succeeded", job
    limit_mb = prod.topology.settings.backend.memory_mb
    peaks = {b.hostname: peak_rss_mb(prod, b.hostname) for b in prod.topology.backends}
    report.LINES.append(f"prod: a {size >> 20} MB one-second job: backend peak RSS {peaks} MB (limit {limit_mb} MB)")
    assert {b: backend_restarts(prod, b) for b in before} == before  # nobody was OOM-killed
    assert max(peaks.values()) < limit_mb / 4, peaks


def peak_rss_mb(deployment: Deployment, hostname: str) -> float:
    """The backend process's own peak resident memory (VmHWM): what it held, not the page cache."""
    code, output = deployment.exec(hostname, ["grep", "VmHWM", "/proc/1/status"])
    assert code == 0, output
    return int(output.split()[1]) / 1024


def backend_restarts(deployment: Deployment, hostname: str) -> tuple[int, bool]:
    state = deployment.client.api.inspect_container(deployment.name(hostname))
    return int(state["RestartCount"]), bool(state["State"]["OOMKilled"])


def test_a_burst_from_one_client_is_limited_with_429s_and_the_api_serves_again(prod: Deployment) -> None:
    ngx = prod.topology.settings.nginx
    path = f"/api/jobs/{uuid.uuid4()}"  # a backend's own 404: cheap, and rate-limited like any API call
    # More requests at once than the burst lets queue, fewer than the connection cap: the
    # connections are opened first, then every request is sent in one go.
    clients = ngx.request_burst + 20
    assert clients < ngx.connections_per_client
    head = f"GET {path} HTTP/1.1\r\nHost: e2e\r\nAuthorization: Bearer {prod.api_token()}\r\nConnection: close\r\n\r\n"
    connections = [socket.create_connection(("127.0.0.1", ngx.http_port), timeout=60) for _ in range(clients)]
    for connection in connections:
        connection.sendall(head.encode())
    answers = []
    for connection in connections:
        raw = b""
        while chunk := connection.recv(65536):
            raw += chunk
        connection.close()
        answers.append((int(raw.split(b" ", 2)[1]), raw.split(b"\r\n\r\n", 1)[1]))
    statuses = [status for status, _ in answers]
    limited = [body for status, body in answers if status == 429]
    report.LINES.append(f"prod: {clients} GETs at once from one address: {len(limited)} got 429")
    # The first and the burst are served (the burst delayed to the rate), the rest refused.
    assert set(statuses) <= {404, 429} and len(limited) >= clients - ngx.request_burst - 1 - 5, statuses
    # What nginx answers itself is the API's kind of answer.
    assert {json.loads(body)["error"] for body in limited} == {render.NGINX_ERRORS[429]}
    wait_not_limited(prod, path)


def wait_not_limited(deployment: Deployment, path: str) -> None:
    deadline = time.monotonic() + 10
    while (status := request(deployment, "GET", path)[0]) == 429:
        assert time.monotonic() < deadline, "still limited"
        time.sleep(0.5)
    assert status == 404


def test_more_connections_from_one_client_than_its_cap_get_429s(prod: Deployment) -> None:
    # Slow uploads hold their connections: past the cap, nginx refuses the next ones at once.
    # They are opened below the request rate, so that only the connection cap can refuse.
    cap = prod.topology.settings.nginx.connections_per_client
    spacing = 1.5 / prod.topology.settings.nginx.requests_per_second
    head = (
        f"POST /api/uploads HTTP/1.1\r\nHost: e2e\r\nAuthorization: Bearer {prod.api_token()}\r\n"
        "Content-Length: 1000000\r\n\r\n"
    ).encode()
    held = []
    try:
        for _ in range(cap):
            connection = socket.create_connection(("127.0.0.1", prod.topology.settings.nginx.http_port), timeout=10)
            connection.sendall(head + b"x" * 1024)
            held.append(connection)
            time.sleep(spacing)
        time.sleep(1)  # every one of them is in progress at nginx
        status, _, raw = request(prod, "GET", f"/api/jobs/{uuid.uuid4()}")
        assert (status, json.loads(raw)) == (429, {"error": render.NGINX_ERRORS[429]})
    finally:
        for connection in held:
            connection.close()
    wait_not_limited(prod, f"/api/jobs/{uuid.uuid4()}")


def slow_client(deployment: Deployment, head: bytes, trickle: bytes, limit: float) -> tuple[float, bytes]:
    """Sends `head`, then `trickle` one byte a second; returns when the server hangs up (or
    after `limit` seconds) the seconds it took and what it answered."""
    connection = socket.create_connection(("127.0.0.1", deployment.topology.settings.nginx.http_port), timeout=2)
    started = time.monotonic()
    answer = b""
    try:
        connection.sendall(head)
        for byte in trickle:
            if time.monotonic() - started > limit:
                break
            try:
                connection.sendall(bytes([byte]))
                answer += connection.recv(65536)
                if answer:
                    break
            except TimeoutError:
                continue  # nothing to read yet: the next byte
            except OSError:
                break  # the server hung up
        connection.settimeout(limit)
        while chunk := connection.recv(65536):
            answer += chunk
    except OSError:
        pass
    finally:
        connection.close()
    return time.monotonic() - started, answer


def test_a_client_sending_a_byte_a_second_is_cut_off(prod: Deployment) -> None:
    # Headers: nginx gives the whole request head client_header_timeout (10 s).
    seconds, _ = slow_client(prod, b"GET /api/jobs/x HTTP/1.1\r\n", b"X-Slow: " + b"a" * 60, limit=30)
    report.LINES.append(f"prod: a client trickling its headers was cut off after {seconds:.1f} s")
    assert seconds < 15
    # A body: the backend cuts off one that averages under 1 KB/s after its 10 s of grace.
    head = (
        f"POST /api/uploads HTTP/1.1\r\nHost: e2e\r\nAuthorization: Bearer {prod.api_token()}\r\n"
        "Content-Length: 100000\r\n\r\n"
    ).encode()
    seconds, answer = slow_client(prod, head, b"v" * 60, limit=30)
    report.LINES.append(f"prod: a client trickling an upload was cut off after {seconds:.1f} s")
    assert seconds < 15 and answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"too slow" in answer


def test_an_upload_that_would_fill_the_disk_is_refused_with_a_507(prod: Deployment) -> None:
    # The reserve set above the free space of this host's disk: no upload may go.
    code, output = prod.exec(prod.topology.backends[0].hostname, ["df", "-B1", "--output=avail", render.UPLOADS_DIR])
    assert code == 0, output
    free = int(output.split()[-1])
    prod.apply({"backend": {"minFreeDisk": f"{free // 1024**2 + 1024}MB"}})
    try:
        prod.wait_all_healthy()
        status, _, raw = request(prod, "POST", "/api/uploads", b"any size at all")
        assert status == 507 and "minFreeDisk" in json.loads(raw)["error"], raw
    finally:
        prod.apply({"backend": {"minFreeDisk": "1GB"}})
        prod.wait_all_healthy()
    assert request(prod, "POST", "/api/uploads", b"fits again")[0] == 201


def test_old_uploads_partial_uploads_and_results_are_removed_on_the_running_stack(prod: Deployment) -> None:
    backend = prod.topology.backends[0].hostname
    owner = prod.topology.settings.backend.api_tokens[0]
    hours = prod.topology.settings.backend.upload_retention_hours
    old = f"{render.UPLOADS_DIR}/{owner}/{'a' * 32}"
    partial = f"{render.UPLOADS_DIR}/{owner}/{'b' * 32}.part"
    kept = f"{render.UPLOADS_DIR}/{owner}/{'c' * 32}"
    result_dir = f"{render.OUTPUTS_DIR}/{uuid.uuid4()}"
    script = (
        f"set -e; echo x >{old}; echo x >{partial}; echo x >{kept}; mkdir {result_dir}; echo '{{}}' >{result_dir}/r\n"
        f"touch -d '{hours + 1} hours ago' {old}; touch -d '2 hours ago' {partial}\n"
        f"touch -d '{prod.topology.settings.backend.output_retention_hours + 1} hours ago' {result_dir}\n"
    )
    code, output = prod.exec(backend, ["bash", "-c", script], user="app")
    assert code == 0, output
    deadline = time.monotonic() + 60
    gone = {path: False for path in (old, partial, result_dir)}
    while not all(gone.values()):
        assert time.monotonic() < deadline, gone
        time.sleep(2)
        gone = {path: prod.exec(backend, ["test", "-e", path])[0] != 0 for path in gone}
    assert prod.exec(backend, ["test", "-e", kept])[0] == 0


# --- what a compromised container could do ----------------------------------------------------


def test_the_apps_redis_user_reaches_only_its_keys_with_only_its_commands(prod: Deployment) -> None:
    app = chaos.RedisUser("app", str(prod.export("redisPassword")))
    master = chaos.redis_node(prod, chaos.current_master(prod), user=app)
    assert master.set("job:e2e-acl", "1") is True and master.get("job:e2e-acl") == b"1"
    refused = [
        ("FLUSHALL",),
        ("CONFIG", "GET", "*"),
        ("CONFIG", "SET", "dir", "/tmp"),
        ("REPLICAOF", "NO", "ONE"),
        ("SET", "not-a-job-key", "x"),
        ("KEYS", "*"),
        ("EVAL", "return 1", "0"),
        ("CLIENT", "KILL", "TYPE", "normal"),
        ("SHUTDOWN",),
        ("ACL", "LIST"),
    ]
    for command in refused:
        with pytest.raises(redis.exceptions.NoPermissionError):
            master.execute_command(*command)
    # On a Sentinel it may discover the master and nothing else.
    sentinel = chaos.sentinel_direct(prod, prod.topology.sentinels[0].hostname, user=app)
    assert sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", REDIS_MASTER_NAME)
    for command in (
        ("SENTINEL", "REMOVE", REDIS_MASTER_NAME),
        ("SENTINEL", "SET", REDIS_MASTER_NAME, "quorum", "1"),
        ("SENTINEL", "FAILOVER", REDIS_MASTER_NAME),
        ("SENTINEL", "RESET", "*"),
        ("SENTINEL", "MONITOR", "evil", "10.0.0.1", "6379", "1"),
        ("SENTINEL", "CONFIG", "GET", "*"),
        ("ACL", "LIST"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            sentinel.execute_command(*command)
    # Replication and the Sentinels' own users read no key either.
    for user, password_file in (
        ("replica", "redis-replication-password"),
        ("sentinel", "redis-sentinel-password"),
    ):
        holder = prod.topology.redis_nodes[0] if user == "replica" else prod.topology.sentinels[0]
        code, password = prod.exec(holder.hostname, ["cat", f"{render.SECRETS_DIR}/{password_file}"])
        assert code == 0, password
        node = chaos.redis_node(prod, chaos.current_master(prod), user=chaos.RedisUser(user, password))
        with pytest.raises(redis.exceptions.NoPermissionError):
            node.get("job:e2e-acl")


def test_a_worker_holds_no_client_key_admits_only_the_master_and_reads_uploads_only(prod: Deployment) -> None:
    worker, other = (n.hostname for n in prod.topology.mpi_workers[:2])
    code, _ = prod.exec(worker, ["test", "-e", "/home/app/.ssh/id_ed25519"])
    assert code != 0, "a worker holds the SSH client key"
    # Even with the master's key (stolen), a worker refuses logins that do not come from the master.
    uploads = plain(prod.evaluation.containers[prod.name("mpi-master")].inputs["uploads"])
    stolen = next(u["content"] for u in uploads if u["file"] == "/home/app/.ssh/id_ed25519")
    code, output = prod.exec(
        other,
        [
            "bash",
            "-c",
            "umask 077; cat >/tmp/stolen <<'KEY'\n" + stolen + "KEY\n"
            f"ssh -i /tmp/stolen -o BatchMode=yes -o StrictHostKeyChecking=no {worker} true",
        ],
        user="app",
    )
    assert code != 0 and "Permission denied" in output, output
    code, output = prod.exec(worker, ["touch", f"{render.UPLOADS_DIR}/planted"], user="app")
    assert code != 0 and "Read-only file system" in output, output
    mounts = {m["Destination"]: m for m in prod.client.api.inspect_container(prod.name(worker))["Mounts"]}
    assert render.OUTPUTS_DIR not in mounts, "a worker mounts the outputs volume"
    assert mounts[render.UPLOADS_DIR]["RW"] is False


def test_the_runner_refuses_an_upload_reference_from_the_database_that_leaves_the_uploads(
    prod: Deployment,
) -> None:
    # Whoever can write the jobs table (the application role) tries to make the MPI runner
    # read the SSH key on the master; the runner checks the owner and id first.
    job_id = str(uuid.uuid4())
    with chaos.pg_writer(prod) as conn:
        conn.execute(
            "INSERT INTO jobs (id, owner, upload_id, duration_seconds, target_language, runner, max_attempts) "
            "VALUES (%s, %s, %s, 90, 'fr', 'mpi', 1)",
            (job_id, "default", "../../../home/app/.ssh/id_ed25519"),
        )
    deadline = time.monotonic() + 180  # the runner may first finish the jobs queued before it
    while True:
        with chaos.pg_writer(prod) as conn:
            row = conn.execute("SELECT status, error FROM jobs WHERE id = %s", (job_id,)).fetchone()
        if row and row[0] == "failed":
            break
        assert time.monotonic() < deadline, row
        time.sleep(0.5)
    assert row is not None and "refused upload reference" in row[1], row


# --- rotation --------------------------------------------------------------------------------------


def test_rotating_every_password_and_a_token_by_config_takes_effect_and_the_old_ones_are_refused(
    prod: Deployment,
) -> None:
    keys = (
        "postgresPassword",
        "replicationPassword",
        "rewindPassword",
        "patroniApiPassword",
        "appDbPassword",
        "redisPassword",
        "redisReplicationPassword",
        "redisSentinelPassword",
        "redisAdminPassword",
        "secretKey",
    )
    old = {key: current_secret(prod, key) for key in keys}
    old_token = prod.api_token(OTHER)
    new = {key: f"rotated-{key.lower()}-{uuid.uuid4().hex[:12]}" for key in keys}
    new["secretKey"] = "rotated-secret-key-" + uuid.uuid4().hex
    nodes = [n.hostname for n in prod.topology.postgres_nodes]
    before = {node: prod.client.containers.get(prod.name(node)).id for node in nodes}
    started = time.monotonic()
    plan = prod.apply({"backend": {"apiTokens": ["default", "mallory-2"]}}, secret_config=new)
    prod.wait_all_healthy()
    chaos.pg_primary(prod)
    chaos.wait_streaming(prod, prod.topology.settings.postgres.replica_count)
    report.LINES.append(f"prod: every password rotated by config, healthy again in {time.monotonic() - started:.0f} s")
    assert {key: current_secret(prod, key) for key in keys} == new
    # The PostgreSQL nodes took theirs live, from the credentials store: none was replaced.
    assert {node: prod.client.containers.get(prod.name(node)).id for node in nodes} == before
    assert "postgres-credentials" in plan.names("replace") and not set(nodes) & plan.names("replace")

    # PostgreSQL: each role takes its new password and refuses the old one. Every replica,
    # made to connect afresh, streams with the new replication password.
    primary = chaos.pg_primary(prod)
    for replica in chaos.pg_replicas(prod):
        chaos.reconnect_walreceiver(prod, replica)
    time.sleep(1)
    chaos.wait_streaming(prod, prod.topology.settings.postgres.replica_count)
    address = chaos.data_ip(prod, primary)
    for user, key, target in (
        ("transvidio", "appDbPassword", "dbname=transvidio"),
        ("rewinder", "rewindPassword", "dbname=postgres"),
        ("replicator", "replicationPassword", "dbname=replication replication=true"),
    ):
        conninfo = f"host={address} user={user} connect_timeout=5 {target}"
        psycopg.connect(f"{conninfo} password={new[key]}").close()
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(f"{conninfo} password={old[key]}")
    code, verifier = prod.exec(
        primary,
        [
            "psql",
            "-h",
            render.POSTGRES_RUN_DIR,
            "-U",
            "postgres",
            "-Atc",
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'",
        ],
    )
    assert code == 0 and scram_matches(verifier.strip(), new["postgresPassword"]), verifier
    assert not scram_matches(verifier.strip(), old["postgresPassword"])
    for password, expected in ((new["patroniApiPassword"], 202), (old["patroniApiPassword"], 401)):
        # A change through Patroni's REST API (here a harmless reload) needs its password.
        code, output = prod.exec(primary, ["python3", "-c", PATRONI_RELOAD, password])
        assert output.strip() == str(expected), output

    # Redis: each user takes its new password on the nodes and Sentinels, and the old is refused.
    master = chaos.current_master(prod)
    for user, key in (("app", "redisPassword"), ("admin", "redisAdminPassword")):
        assert chaos.redis_node(prod, master, user=chaos.RedisUser(user, new[key])).ping()
        with pytest.raises(redis.exceptions.AuthenticationError):
            chaos.redis_node(prod, master, user=chaos.RedisUser(user, old[key])).ping()
        sentinel = prod.topology.sentinels[0].hostname
        assert chaos.sentinel_direct(prod, sentinel, user=chaos.RedisUser(user, new[key])).ping()
        with pytest.raises(redis.exceptions.AuthenticationError):
            chaos.sentinel_direct(prod, sentinel, user=chaos.RedisUser(user, old[key])).ping()
    replicas = chaos.replication(chaos.redis_node(prod, master))
    assert replicas["connected_slaves"] == prod.topology.settings.redis.replica_count, replicas
    sentinel_client = chaos.sentinel_direct(prod, prod.topology.sentinels[0].hostname)
    assert sentinel_client.execute_command("SENTINEL", "CKQUORUM", REDIS_MASTER_NAME).startswith(b"OK")
    for user, key in (("replica", "redisReplicationPassword"), ("sentinel", "redisSentinelPassword")):
        assert chaos.redis_node(prod, master, user=chaos.RedisUser(user, new[key])).ping()
        with pytest.raises(redis.exceptions.AuthenticationError):
            chaos.redis_node(prod, master, user=chaos.RedisUser(user, old[key])).ping()

    # The API: the renamed token is new, the old one refused; result links are signed anew.
    status, _, _ = request(prod, "GET", f"/api/jobs/{uuid.uuid4()}", token=old_token)
    assert status == 401
    new_token = prod.api_token("mallory-2")
    assert new_token != old_token
    status, _, raw = request(
        prod, "POST", "/api/jobs", job_body(upload(prod, b"after", token=new_token)), token=new_token
    )
    assert status == 201, raw
    job = wait_done(prod, json.loads(raw)["id"], token=new_token)
    assert job["status"] == "succeeded", job
    assert request(prod, "GET", job["result_url"], token=None)[0] == 200
    stale = job["result_url"].split("&signature=")[0] + "&signature=" + old_signature(old["secretKey"], job)
    assert request(prod, "GET", stale, token=None)[0] == 403


PATRONI_RELOAD = """
import base64, sys, urllib.error, urllib.request
auth = base64.b64encode(("patroni:" + sys.argv[1]).encode()).decode()
request = urllib.request.Request("http://127.0.0.1:8008/reload", data=b"", method="POST",
                                 headers={"Authorization": "Basic " + auth})
try:
    print(urllib.request.urlopen(request, timeout=10).status)
except urllib.error.HTTPError as error:
    print(error.code)
"""


def current_secret(deployment: Deployment, key: str) -> str:
    """The value a secret has in the stack now: the operator's, or the generated one."""
    if key in deployment.secret_config:
        return deployment.secret_config[key]
    child = {
        "postgresPassword": "postgres-superuser",
        "replicationPassword": "postgres-replication",
        "rewindPassword": "postgres-rewind",
        "patroniApiPassword": "patroni-api",
        "appDbPassword": "postgres-app",
        "redisPassword": "redis",
        "redisReplicationPassword": "redis-replication",
        "redisSentinelPassword": "redis-sentinel",
        "redisAdminPassword": "redis-admin",
        "secretKey": "secret-key",
    }[key]
    [password] = [r for r in deployment.evaluation.of_type("random:index/randomPassword:RandomPassword")
                  if r.name == f"secrets-{child}"]  # fmt: skip
    return str(plain(password.outputs["result"]))


def old_signature(secret_key: str, job: dict[str, Any]) -> str:
    import hashlib
    import hmac

    expires = job["result_url"].split("expires=")[1].split("&")[0]
    return hmac.new(secret_key.encode(), f"result:{job['id']}:{expires}".encode(), hashlib.sha256).hexdigest()


def scram_matches(verifier: str, password: str) -> bool:
    """Whether PostgreSQL's SCRAM-SHA-256 verifier was made from `password` (RFC 5802/7677)."""
    import base64
    import hashlib
    import hmac

    method, rest = verifier.split("$", 1)
    iterations_salt, keys = rest.split("$", 1)
    iterations, salt = iterations_salt.split(":", 1)
    stored_key, _server_key = keys.split(":", 1)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return method == "SCRAM-SHA-256" and base64.b64encode(hashlib.sha256(client_key).digest()).decode() == stored_key
