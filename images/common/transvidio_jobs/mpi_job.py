"""One long job across MPI ranks: each rank processes its segments, rank 0 assembles.

mpirun --hostfile H python3 -m transvidio_jobs.mpi_job JOB_ID UPLOAD DURATION LANGUAGE OUTPUTS_DIR
"""

from __future__ import annotations

import socket
import sys

from mpi4py import MPI

from transvidio_jobs.processing import assemble, load_step, read_segment, write_result


def main(argv: list[str]) -> int:
    job_id, upload, duration_text, language, outputs_dir = argv
    duration = int(duration_text)
    comm = MPI.COMM_WORLD
    step = load_step()
    host = socket.gethostname()
    mine = []
    for index in range(comm.rank, duration, comm.size):  # round-robin: balanced for equal segments
        result = step(read_segment(upload, duration, index), index, language)
        mine.append({**result, "rank": comm.rank, "host": host})
    gathered = comm.gather(mine, root=0)
    if comm.rank == 0:
        assert gathered is not None
        result = assemble(job_id, language, [segment for part in gathered for segment in part])
        result["ranks"] = comm.size
        print(write_result(outputs_dir, job_id, result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
