"""The MPI master's job runner: claims long jobs and runs each with mpirun over the nodes of
the hostfile that answer.

One dead rank kills an MPI job, so each run starts only on the nodes whose SSH port answers
at that moment (a worker stopped, a swarm node lost): the job runs on the others rather than
failing every attempt until the node is back. A failed mpirun (a node lost mid-run) marks
the attempt failed with the tail of its output; the job is queued again while attempts
remain. If this process dies, the container restarts it and the job's lease expires, so
another attempt takes it.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from transvidio_jobs import processing
from transvidio_jobs.worker import run_forever

MPI_TIMEOUT_SECONDS = int(os.environ.get("MPI_JOB_TIMEOUT_SECONDS", "3600"))
SSH_PORT = 22
PROBE_SECONDS = 2.0  # a node on the data network answers in milliseconds, or never

log = logging.getLogger("transvidio.runner")


def slots(hostfile: str) -> int:
    total = 0
    with open(hostfile) as lines:
        for line in lines:
            fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
            if line.strip():
                total += int(fields.get("slots", "1"))
    return total


def answers(host: str) -> bool:
    """Whether the host's SSH port accepts a connection within PROBE_SECONDS."""
    try:
        with socket.create_connection((host, SSH_PORT), timeout=PROBE_SECONDS):
            return True
    except OSError:
        return False


def answering_lines(hostfile: str) -> list[str]:
    """The hostfile's lines whose host answers now, in the hostfile's order (probed side by side)."""
    with open(hostfile) as lines:
        entries = [line for line in lines if line.strip()]
    with ThreadPoolExecutor(max_workers=max(1, len(entries))) as pool:
        up = list(pool.map(lambda line: answers(line.split()[0]), entries))
    left_out = [line.split()[0] for line, ok in zip(entries, up, strict=True) if not ok]
    if left_out:
        log.warning("MPI nodes that do not answer, left out of this run: %s", " ".join(left_out))
    return [line for line, ok in zip(entries, up, strict=True) if ok]


def execute(job: dict[str, Any]) -> str:
    uploads_dir = os.environ["UPLOADS_DIR"]
    owner, upload_id = str(job["owner"]), str(job["upload_id"])
    # Checked here as every rank checks it: a bad reference fails the job before mpirun starts.
    os.close(processing.open_upload(uploads_dir, owner, upload_id))
    lines = answering_lines(os.environ["MPI_HOSTFILE"])
    if not lines:
        raise RuntimeError("no MPI node answers")
    with tempfile.NamedTemporaryFile("w", prefix="hostfile-", suffix=".txt") as hostfile:
        hostfile.writelines(lines)
        hostfile.flush()
        return _run(job, hostfile.name, uploads_dir, owner, upload_id)


def _run(job: dict[str, Any], hostfile: str, uploads_dir: str, owner: str, upload_id: str) -> str:
    # MPI_RANKS (the benchmark's setting) asks for fewer ranks than slots, never for more than answer.
    available = slots(hostfile)
    ranks = min(int(os.environ.get("MPI_RANKS") or available), available)
    command = [
        "mpirun",
        "--hostfile",
        hostfile,
        "-np",
        str(ranks),
        "-x",
        "PYTHONPATH",
        *(
            arg
            for name in ("TRANSVIDIO_SEGMENT_ROUNDS", "TRANSVIDIO_SEGMENT_STEP")
            if name in os.environ
            for arg in ("-x", name)
        ),
        sys.executable,
        "-m",
        "transvidio_jobs.mpi_job",
        str(job["id"]),
        uploads_dir,
        owner,
        upload_id,
        str(job["duration_seconds"]),
        job["target_language"],
        os.environ["OUTPUTS_DIR"],
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=MPI_TIMEOUT_SECONDS, check=False)
    tail = (done.stderr or done.stdout)[-1500:]
    if done.returncode != 0:
        raise RuntimeError(f"mpirun exited {done.returncode}: {tail}")
    try:
        return processing.last_output_line(done.stdout)
    except ValueError:
        # Seen on Docker: a worker killed while its rank starts up can leave PRRTE exiting 0
        # with no rank's output. The attempt failed all the same, and is retried.
        raise RuntimeError(f"mpirun exited 0 without a result: {tail}") from None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s runner %(levelname)s %(message)s")
    run_forever("mpi", execute)
