"""MPI smoke test: every rank reports its host; rank 0 prints them as JSON.

Run on the master as the app user:
    mpirun --hostfile /etc/transvidio/mpi/hostfile python3 /usr/local/lib/transvidio/cluster_check.py
"""

import json
import socket

from mpi4py import MPI

comm = MPI.COMM_WORLD
hosts = comm.gather(socket.gethostname(), root=0)
if comm.rank == 0:
    print(json.dumps({"size": comm.size, "hosts": hosts}))
