#!/usr/bin/env bash
# Runs sshd in the foreground. The stack uploads the host key, the app user's
# client key, authorized_keys, a pinned known_hosts and the hostfile before start.
set -euo pipefail

for required in /etc/ssh/ssh_host_ed25519_key /etc/ssh/ssh_known_hosts /home/app/.ssh/id_ed25519 \
    /home/app/.ssh/authorized_keys /etc/transvidio/mpi/hostfile; do
    if [ ! -s "$required" ]; then
        echo "mpi entrypoint: $required is missing; the stack uploads it" >&2
        exit 64
    fi
done
/usr/sbin/sshd -t
exec /usr/sbin/sshd -D -e
