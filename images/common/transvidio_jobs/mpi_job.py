"""One long job across MPI ranks: each rank processes its segments, rank 0 assembles.

mpirun --hostfile H python3 -m transvidio_jobs.mpi_job JOB_ID UPLOADS_DIR OWNER UPLOAD_ID DURATION LANGUAGE OUTPUTS_DIR
"""

from __future__ import annotations

import os
import socket
import sys

from mpi4py import MPI

from transvidio_jobs.processing import assemble, open_upload, process_segments, write_result


def main(argv: list[str]) -> int:
    job_id, uploads_dir, owner, upload_id, duration_text, language, outputs_dir = argv
    duration = int(duration_text)
    comm = MPI.COMM_WORLD
    descriptor = open_upload(uploads_dir, owner, upload_id)
    try:
        # Round-robin: balanced for equal segments.
        mine = process_segments(
            descriptor, duration, language, range(comm.rank, duration, comm.size), comm.rank, socket.gethostname()
        )
    finally:
        os.close(descriptor)
    gathered = comm.gather(mine, root=0)
    if comm.rank == 0:
        assert gathered is not None
        result = assemble(job_id, language, [segment for part in gathered for segment in part])
        result["ranks"] = comm.size
        print(write_result(outputs_dir, job_id, result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
