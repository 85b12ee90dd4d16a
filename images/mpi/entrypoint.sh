#!/usr/bin/env bash
# Every node runs sshd (MPI launches over SSH). The master (MPI_ROLE=mpi-master) also runs
# the job runner as the app user, in the foreground: if it dies, the container restarts
# and the job it held is claimed again once its lease expires. The stack uploads the
# host key, the app user's client key, authorized_keys, known_hosts and the hostfile.
set -euo pipefail

for required in /etc/ssh/ssh_host_ed25519_key /etc/ssh/ssh_known_hosts /home/app/.ssh/id_ed25519 \
    /home/app/.ssh/authorized_keys /etc/transvidio/mpi/hostfile; do
    if [ ! -s "$required" ]; then
        echo "mpi entrypoint: $required is missing; the stack uploads it" >&2
        exit 64
    fi
done
/usr/sbin/sshd -t
if [ "${MPI_ROLE:-mpi-worker}" = mpi-master ]; then
    /usr/sbin/sshd -e
    export HOME=/home/app USER=app LOGNAME=app
    exec setpriv --reuid=app --regid=app --init-groups -- python3 -m transvidio_jobs.runner
fi
exec /usr/sbin/sshd -D -e
