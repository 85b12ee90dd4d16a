"""The MPI master's job runner: claims long jobs and runs each with mpirun over the hostfile.

A failed mpirun marks the attempt failed with the tail of its output; the job is queued
again while attempts remain. If this process dies, the container restarts it and the
job's lease expires, so another attempt takes it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

from transvidio_jobs import processing
from transvidio_jobs.worker import run_forever

MPI_TIMEOUT_SECONDS = int(os.environ.get("MPI_JOB_TIMEOUT_SECONDS", "3600"))


def slots(hostfile: str) -> int:
    total = 0
    with open(hostfile) as lines:
        for line in lines:
            fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
            if line.strip():
                total += int(fields.get("slots", "1"))
    return total


def execute(job: dict[str, Any]) -> str:
    hostfile = os.environ["MPI_HOSTFILE"]
    uploads_dir = os.environ["UPLOADS_DIR"]
    owner, upload_id = str(job["owner"]), str(job["upload_id"])
    # Checked here as every rank checks it: a bad reference fails the job before mpirun starts.
    os.close(processing.open_upload(uploads_dir, owner, upload_id))
    ranks = int(os.environ.get("MPI_RANKS") or slots(hostfile))
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
    if done.returncode != 0:
        raise RuntimeError(f"mpirun exited {done.returncode}: {(done.stderr or done.stdout)[-1500:]}")
    return processing.last_output_line(done.stdout)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s runner %(levelname)s %(message)s")
    run_forever("mpi", execute)
