"""The claim loop (images/common/transvidio_jobs/worker.py), the MPI job's ranks (mpi_job.py)
and the MPI master's runner (runner.py): what each does with the queue's answers, its
connections, mpirun and their errors.

The queue's SQL (claim with SKIP LOCKED, leases, backoff, exactly-once completion) is proven
against the stack's PostgreSQL in tests/e2e/test_images_behaviour.py; here the queue's
functions are recorders, so the loop's own decisions are what is under test.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import types
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from transvidio_jobs import processing, queue, worker

JOB = {"id": "job-1", "attempts": 1}


class Recorder:
    """queue.claim/extend/complete/fail as calls recorded in order, claim answering `jobs`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, jobs: list[dict[str, Any] | None], done: bool = True) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.jobs, self.done = list(jobs), done
        monkeypatch.setattr(queue, "claim", self.claim)
        monkeypatch.setattr(queue, "extend", lambda conn, job, lease: self.calls.append(("extend", job["id"], lease)))
        monkeypatch.setattr(queue, "complete", self.complete)
        monkeypatch.setattr(queue, "fail", lambda conn, job, reason: self.calls.append(("fail", job["id"], reason)))
        monkeypatch.setattr(queue, "ensure_schema", lambda conn: self.calls.append(("ensure_schema", conn)))

    def claim(self, conn: Any, runner: str, name: str, lease: int) -> dict[str, Any] | None:
        self.calls.append(("claim", conn, runner, name, lease))
        return self.jobs.pop(0) if self.jobs else None

    def complete(self, conn: Any, job: dict[str, Any], result_path: str) -> bool:
        self.calls.append(("complete", job["id"], result_path))
        return self.done


class FakeConnection:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> FakeConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_the_conninfo_is_the_env_contract_with_the_password_from_its_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    (tmp_path / "password").write_text("s3cret\n")
    env = {
        "POSTGRES_PASSWORD_FILE": str(tmp_path / "password"),
        "POSTGRES_MASTER_HOST": "postgres-primary,postgres-replica-1",
        "POSTGRES_DB": "transvidio",
        "POSTGRES_USER": "transvidio_app",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("POSTGRES_PORT", raising=False)
    monkeypatch.delenv("POSTGRES_PASSWORD", raising=False)
    assert conninfo_to_dict(worker.primary_conninfo()) == {
        "host": "postgres-primary,postgres-replica-1",
        "port": "5432",
        "dbname": "transvidio",
        "user": "transvidio_app",
        "password": "s3cret",
        "connect_timeout": "3",
        "target_session_attrs": "read-write",
        "keepalives": "1",
        "keepalives_idle": "5",
        "keepalives_interval": "2",
        "keepalives_count": "2",
        "tcp_user_timeout": "8000",
        "options": "-c synchronous_commit=local",
    }
    monkeypatch.setenv("POSTGRES_PORT", "6432")
    assert conninfo_to_dict(worker.primary_conninfo())["port"] == "6432"


def test_no_job_to_claim_runs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch, [None])
    ran: list[Any] = []
    assert worker.run_once("claim-conn", "dsn", "mpi", "w1", ran.append) is False  # type: ignore[arg-type]
    assert recorder.calls == [("claim", "claim-conn", "mpi", "w1", worker.LEASE_SECONDS)] and ran == []


def test_a_claimed_job_runs_and_is_completed_with_its_result_path(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch, [dict(JOB)])
    assert worker.run_once("c", "dsn", "backend", "w1", lambda job: f"{job['id']}/result.json") is True  # type: ignore[arg-type]
    assert recorder.calls[1:] == [("complete", "job-1", "job-1/result.json")]


def test_a_job_taken_over_meanwhile_still_counts_as_run(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch, [dict(JOB)], done=False)
    assert worker.run_once("c", "dsn", "backend", "w1", lambda job: "r") is True  # type: ignore[arg-type]
    assert recorder.calls[-1] == ("complete", "job-1", "r")


def test_a_failing_job_is_failed_with_the_errors_kind_and_text_and_never_completed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder(monkeypatch, [dict(JOB)])

    def execute(job: dict[str, Any]) -> str:
        raise ValueError("bad segment")

    assert worker.run_once("c", "dsn", "backend", "w1", execute) is True  # type: ignore[arg-type]
    assert recorder.calls[1:] == [("fail", "job-1", "ValueError: bad segment")]


def test_the_heartbeat_extends_the_lease_while_the_job_runs_and_stops_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "LEASE_SECONDS", 0.3)  # a beat every 0.1 s
    recorder = Recorder(monkeypatch, [dict(JOB)])
    connections: list[str] = []

    def connect(conninfo: str, autocommit: bool = False) -> FakeConnection:
        assert autocommit is True
        connections.append(conninfo)
        return FakeConnection()

    monkeypatch.setattr(psycopg, "connect", connect)
    beats = threading.Event()

    def execute(job: dict[str, Any]) -> str:
        # Runs until the lease has been extended three times on the job's own connections
        # (or 5 s, for a heartbeat that never beats: the assertions below then fail).
        for _ in range(100):
            if sum(1 for call in recorder.calls if call[0] == "extend") >= 3:
                break
            beats.wait(0.05)
        return "r"

    assert worker.run_once("c", "heartbeat-dsn", "mpi", "w1", execute) is True  # type: ignore[arg-type]
    extended = [call for call in recorder.calls if call[0] == "extend"]
    assert extended[:3] == [("extend", "job-1", 0.3)] * 3
    assert set(connections) == {"heartbeat-dsn"}
    count = len(extended)
    beats.wait(0.5)  # stopped with the job: no beat after it completed
    assert len([call for call in recorder.calls if call[0] == "extend"]) == count
    assert recorder.calls.index(("complete", "job-1", "r")) > recorder.calls.index(extended[0])


def test_a_heartbeat_that_cannot_connect_keeps_trying(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "LEASE_SECONDS", 0.15)
    attempts: list[str] = []

    def connect(conninfo: str, autocommit: bool = False) -> FakeConnection:
        attempts.append(conninfo)
        raise psycopg.OperationalError("primary gone")

    monkeypatch.setattr(psycopg, "connect", connect)
    heartbeat = worker.Heartbeat("dsn", dict(JOB))
    assert heartbeat.daemon is True  # a stuck beat never keeps the process alive
    heartbeat.start()
    threading.Event().wait(0.4)
    heartbeat.stopped.set()
    heartbeat.join(1)
    assert not heartbeat.is_alive() and len(attempts) >= 2


def test_the_loop_reconnects_after_an_error_and_polls_while_the_queue_is_empty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker, "primary_conninfo", lambda: "dsn")
    opened: list[FakeConnection] = []
    stop = threading.Event()
    outcomes: list[Any] = [psycopg.OperationalError("down"), False, True, "stop"]

    def connect(conninfo: str, autocommit: bool = False) -> FakeConnection:
        assert (conninfo, autocommit) == ("dsn", True)
        opened.append(FakeConnection())
        return opened[-1]

    def run_once(conn: FakeConnection, conninfo: str, runner: str, name: str, execute: Any) -> bool:
        assert conn is opened[-1] and not conn.closed and runner == "mpi"
        # A claim names its process and this incarnation of it.
        assert re.fullmatch(rf"{re.escape(socket.gethostname())}:{os.getpid()}:[0-9a-f]{{6}}", name), name
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        if outcome == "stop":
            stop.set()
            return True
        return bool(outcome)

    waits: list[float] = []
    monkeypatch.setattr(psycopg, "connect", connect)
    monkeypatch.setattr(worker, "run_once", run_once)
    monkeypatch.setattr(stop, "wait", lambda seconds: waits.append(seconds))
    schemas = Recorder(monkeypatch, [])
    worker.run_forever("mpi", lambda job: "r", stop)
    # The failed connection was closed and replaced; the schema ensured on each new one.
    assert len(opened) == 2 and opened[0].closed and not opened[1].closed
    assert [call for call in schemas.calls if call[0] == "ensure_schema"] == [("ensure_schema", c) for c in opened]
    # 2 s after an error, the poll interval after an empty claim, none after a job.
    assert waits == [2, worker.POLL_SECONDS]


# --- the MPI job ------------------------------------------------------------------------------


class FakeComm:
    def __init__(self, rank: int, size: int, others: list[list[dict[str, Any]]]) -> None:
        self.rank, self.size, self.others = rank, size, others
        self.sent: list[dict[str, Any]] = []

    def gather(self, mine: list[dict[str, Any]], root: int) -> list[list[dict[str, Any]]] | None:
        assert root == 0
        self.sent = mine
        return [mine, *self.others] if self.rank == 0 else None


def mpi_job(monkeypatch: pytest.MonkeyPatch, comm: FakeComm) -> types.ModuleType:
    """mpi_job imported with mpi4py replaced by a world of `comm` (mpi4py is in the MPI image only)."""
    monkeypatch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=types.SimpleNamespace(COMM_WORLD=comm)))
    monkeypatch.delitem(sys.modules, "transvidio_jobs.mpi_job", raising=False)
    import transvidio_jobs.mpi_job as module

    return module


@pytest.mark.parametrize(("rank", "size"), [(0, 1), (0, 2), (1, 2)])
def test_each_rank_processes_its_segments_and_rank_0_writes_the_assembled_result(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], rank: int, size: int
) -> None:
    upload_id = "0123456789abcdef" * 2
    (tmp_path / "uploads" / "alice").mkdir(parents=True)
    (tmp_path / "uploads" / "alice" / upload_id).write_bytes(b"v" * 90)
    monkeypatch.setattr(processing, "ROUNDS", 1)

    def segments(indices: range, rank: int) -> list[dict[str, Any]]:
        descriptor = processing.open_upload(str(tmp_path / "uploads"), "alice", upload_id)
        try:
            return processing.process_segments(descriptor, 9, "fr", indices, rank, "h")
        finally:
            os.close(descriptor)

    # The other ranks' segments, as they would have computed them.
    comm = FakeComm(rank, size, [segments(range(r, 9, size), r) for r in range(1, size)])
    module = mpi_job(monkeypatch, comm)
    argv = ["job-1", str(tmp_path / "uploads"), "alice", upload_id, "9", "fr", str(tmp_path / "outputs")]
    assert module.main(argv) == 0
    # Round robin: this rank's own segments, each tagged with it.
    assert [(s["index"], s["rank"]) for s in comm.sent] == [(i, rank) for i in range(rank, 9, size)]
    printed = capsys.readouterr().out.strip()
    if rank != 0:
        assert printed == "" and not (tmp_path / "outputs").exists()
        return
    assert printed == "job-1/result.json"
    result = json.loads((tmp_path / "outputs" / printed).read_text())
    assert (result["ranks"], result["job_id"], result["target_language"]) == (size, "job-1", "fr")
    assert [segment["index"] for segment in result["segments"]] == list(range(9))
    assert [s["digest"] for s in result["segments"]] == [s["digest"] for s in segments(range(9), 0)]


# --- the MPI master's runner -------------------------------------------------------------------


def test_the_hostfile_gives_its_total_slots_one_per_host_without_a_count(tmp_path: pathlib.Path) -> None:
    from transvidio_jobs import runner

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("mpi-master slots=2\nmpi-worker-1 slots=3 max_slots=3\n\nmpi-worker-2\n   \n")
    assert runner.slots(str(hostfile)) == 6


class Completed:
    def __init__(self, returncode: int, stdout: str = "", stderr: str = "") -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def ssh_port(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A port that accepts connections on 127.0.0.1 only: the runner's probe of an MPI node's SSH."""
    from transvidio_jobs import runner

    listener = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setattr(runner, "SSH_PORT", listener.getsockname()[1])
    yield listener.getsockname()[1]
    listener.close()


# Two nodes that answer (127.0.0.1 and localhost) and one that refuses (nothing listens on 127.0.0.3).
HOSTFILE = "127.0.0.1 slots=1\n\n127.0.0.3 slots=4\nlocalhost slots=2\n"


def runner_job(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, hostfile: str = HOSTFILE, **env: str
) -> dict[str, Any]:
    upload_id = "0123456789abcdef" * 2
    (tmp_path / "uploads" / "alice").mkdir(parents=True)
    (tmp_path / "uploads" / "alice" / upload_id).write_bytes(b"video")
    (tmp_path / "hostfile").write_text(hostfile)
    for name in ("MPI_RANKS", "TRANSVIDIO_SEGMENT_ROUNDS", "TRANSVIDIO_SEGMENT_STEP"):
        monkeypatch.delenv(name, raising=False)
    base = {"MPI_HOSTFILE": str(tmp_path / "hostfile"), "UPLOADS_DIR": str(tmp_path / "uploads"), "OUTPUTS_DIR": "/out"}
    for name, value in {**base, **env}.items():
        monkeypatch.setenv(name, value)
    return {"id": "job-7", "owner": "alice", "upload_id": upload_id, "duration_seconds": 90, "target_language": "de"}


class Mpirun:
    """subprocess.run for mpirun: records each command and the hostfile it was given, as it was then."""

    def __init__(self, answer: Completed) -> None:
        self.answer = answer
        self.runs: list[tuple[list[str], dict[str, Any], str]] = []

    def __call__(self, command: list[str], **kwargs: Any) -> Completed:
        hostfile = pathlib.Path(command[command.index("--hostfile") + 1]).read_text()
        self.runs.append((command, kwargs, hostfile))
        return self.answer


def test_a_job_runs_under_mpirun_on_every_slot_of_the_nodes_that_answer_and_returns_its_result_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, ssh_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    from transvidio_jobs import runner

    job = runner_job(monkeypatch, tmp_path, TRANSVIDIO_SEGMENT_ROUNDS="10", TRANSVIDIO_SEGMENT_STEP="mod:fn")
    mpirun = Mpirun(Completed(0, stdout="rank chatter\njob-7/result.json\n"))
    monkeypatch.setattr(subprocess, "run", mpirun)
    with caplog.at_level(logging.WARNING):
        assert runner.execute(job) == "job-7/result.json"
    (command, kwargs, hostfile), *rest = mpirun.runs
    assert rest == []
    assert hostfile == "127.0.0.1 slots=1\nlocalhost slots=2\n"  # 127.0.0.3 refused: left out
    # The operator is told which node was left out, by its host alone.
    assert [(record.name, record.getMessage()) for record in caplog.records] == [
        ("transvidio.runner", "MPI nodes that do not answer, left out of this run: 127.0.0.3")
    ]
    given = command[command.index("--hostfile") + 1]
    assert not pathlib.Path(given).exists()  # the run's own copy, removed after it
    assert command == [
        "mpirun", "--hostfile", given, "-np", "3", "-x", "PYTHONPATH",
        "-x", "TRANSVIDIO_SEGMENT_ROUNDS", "-x", "TRANSVIDIO_SEGMENT_STEP",
        sys.executable, "-m", "transvidio_jobs.mpi_job",
        "job-7", str(tmp_path / "uploads"), "alice", job["upload_id"], "90", "de", "/out",
    ]  # fmt: skip
    assert kwargs == {"capture_output": True, "text": True, "timeout": runner.MPI_TIMEOUT_SECONDS, "check": False}
    monkeypatch.setenv("MPI_RANKS", "2")  # a setting asks for fewer ranks than slots
    runner.execute(job)
    assert mpirun.runs[-1][0][mpirun.runs[-1][0].index("-np") + 1] == "2"
    monkeypatch.setenv("MPI_RANKS", "7")  # and never gets more than the slots that answer
    runner.execute(job)
    assert mpirun.runs[-1][0][mpirun.runs[-1][0].index("-np") + 1] == "3"


def test_with_no_node_answering_the_attempt_fails_before_mpirun(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, ssh_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    from transvidio_jobs import runner

    job = runner_job(monkeypatch, tmp_path, hostfile="127.0.0.3 slots=2\n127.0.0.4\n")
    mpirun = Mpirun(Completed(0))
    monkeypatch.setattr(subprocess, "run", mpirun)
    with pytest.raises(RuntimeError, match=r"^no MPI node answers$"), caplog.at_level(logging.WARNING):
        runner.execute(job)
    assert mpirun.runs == []
    assert [record.getMessage() for record in caplog.records] == [
        "MPI nodes that do not answer, left out of this run: 127.0.0.3 127.0.0.4"
    ]


def test_the_nodes_are_probed_side_by_side_within_the_probe_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    from transvidio_jobs import runner

    # A node that never answers (a lost swarm node: its packets dropped) costs the probe's
    # time once, not once per node: they are probed at once.
    probed: list[float] = []
    barrier = threading.Barrier(3, timeout=5)

    def answers(host: str) -> bool:
        barrier.wait()  # all three probes are under way together, or this times out
        probed.append(1.0)
        return host != "lost"

    monkeypatch.setattr(runner, "answers", answers)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("a slots=1\nlost slots=1\nb slots=2\n")
    assert runner.answering_lines(str(hostfile)) == ["a slots=1\n", "b slots=2\n"]
    assert len(probed) == 3


def test_a_failed_mpirun_fails_the_attempt_with_the_tail_of_its_output(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, ssh_port: int
) -> None:
    from transvidio_jobs import runner

    job = runner_job(monkeypatch, tmp_path)
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: Completed(3, "out", "x" * 2000 + "END"))
    with pytest.raises(RuntimeError) as raised:
        runner.execute(job)
    assert str(raised.value) == "mpirun exited 3: " + ("x" * 2000 + "END")[-1500:]
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: Completed(1, "only stdout", ""))
    with pytest.raises(RuntimeError, match=r"^mpirun exited 1: only stdout$"):
        runner.execute(job)
    # Exit 0 with nothing printed is a failed attempt too, in the same words.
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: Completed(0, "\x00\n", "prted lost"))
    with pytest.raises(RuntimeError, match=r"^mpirun exited 0 without a result: prted lost$"):
        runner.execute(job)


def test_a_bad_upload_reference_fails_the_job_before_mpirun_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    from transvidio_jobs import runner

    job = runner_job(monkeypatch, tmp_path)
    started: list[Any] = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: started.append(command))
    for bad in ({"upload_id": "../../etc/passwd"}, {"owner": "bob"}):
        with pytest.raises((ValueError, FileNotFoundError)):
            runner.execute({**job, **bad})
    assert started == []


def test_an_outcome_that_cannot_be_recorded_is_retried_on_new_connections_until_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker, "RECORD_SECONDS", 0.3)
    monkeypatch.setattr(worker, "RECORD_RETRY_SECONDS", 0.05)
    opened: list[FakeConnection] = []

    def connect(conninfo: str, autocommit: bool = False) -> FakeConnection:
        assert (conninfo, autocommit) == ("dsn", True)
        opened.append(FakeConnection())
        return opened[-1]

    monkeypatch.setattr(psycopg, "connect", connect)
    writes: list[Any] = []

    def write(db: Any) -> bool:
        writes.append(db)
        if len(writes) < 3:
            raise psycopg.OperationalError("primary gone")
        return True

    # The claim connection first, then new ones until one takes the write.
    assert worker.record("claim-conn", "dsn", JOB, write) is True  # type: ignore[arg-type]
    assert writes == ["claim-conn", *opened] and len(opened) == 2 and all(c.closed for c in opened)
    writes.clear()

    def never(db: Any) -> bool:
        writes.append(db)
        raise psycopg.OperationalError("primary gone")

    # A write that never succeeds gives up once the deadline has passed, with the error.
    with pytest.raises(psycopg.OperationalError, match="primary gone"):
        worker.record("claim-conn", "dsn", JOB, never)  # type: ignore[arg-type]
    assert writes[0] == "claim-conn" and len(writes) >= 3  # it did retry before giving up
