#!/usr/bin/env bash
# Every node runs sshd (MPI launches over SSH). The master (MPI_ROLE=mpi-master) launches:
# it holds the app user's client key, known_hosts and the hostfile, and runs the job
# runner as the app user in the foreground: if it dies, the container restarts and the
# job it held is claimed again once its lease expires. A worker holds only the
# authorized_keys that admit the master. The stack uploads all of these.
set -euo pipefail

role=${MPI_ROLE:-mpi-worker}
required=(/etc/ssh/ssh_host_ed25519_key)
if [ "$role" = mpi-master ]; then
    required+=(/etc/ssh/ssh_known_hosts /home/app/.ssh/id_ed25519 /etc/transvidio/mpi/hostfile)
else
    required+=(/home/app/.ssh/authorized_keys)
fi
for file in "${required[@]}"; do
    if [ ! -s "$file" ]; then
        echo "mpi entrypoint: $file is missing; the stack uploads it" >&2
        exit 64
    fi
done
/usr/sbin/sshd -t
if [ "$role" = mpi-master ]; then
    /usr/sbin/sshd -e
    export HOME=/home/app USER=app LOGNAME=app
    exec setpriv --reuid=app --regid=app --init-groups -- python3 -m transvidio_jobs.runner
fi
exec /usr/sbin/sshd -D -e
