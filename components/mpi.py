"""MpiCluster: an Open MPI master and workers that launch over SSH."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_tls as tls

from components import render
from components.container import (
    ROOT_UID,
    SERVICE_UIDS,
    ContainerSpec,
    Networks,
    VolumeMount,
    child_name,
    config_file,
    role_image,
    secret_file,
    service_container,
    shared_volume,
)
from components.settings import Settings
from components.topology import SSH_PORT, Node, Topology

COMPONENT = "mpi"
HOME = "/home/app"
# sshd runs as root in these containers (MPI launches over SSH) and needs these back.
SSHD_CAPABILITIES = (
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "KILL",
    "NET_BIND_SERVICE",
    "SETGID",
    "SETUID",
    "SYS_CHROOT",
)


@dataclass(frozen=True)
class MpiClusterArgs:
    settings: Settings
    networks: Networks
    uploads_volume: pulumi.Input[str]
    outputs_volume: pulumi.Input[str]
    postgres_password: pulumi.Input[str]  # the job runner on the master reads the queue


class MpiCluster(pulumi.ComponentResource):
    """Deploys an MPI master and N workers sharing a workspace volume.

    The stack generates the app user's SSH key and every node's host key
    (pulumi-tls, ed25519); known_hosts is rendered from those host keys, so no node
    ever skips host key checking. Only the master holds the client key and launches
    (PRRTE without tree spawn: it reaches every worker itself), and a worker accepts that
    key only from the master's address. The hostfile lists every node with its slots, and
    Open MPI and PRRTE are pinned to the data subnet. The master also runs the job runner,
    which claims long jobs from PostgreSQL and runs them with mpirun; every node reads
    the uploads (read-only), and only the master, where rank 0 assembles, writes outputs.
    """

    def __init__(self, name: str, args: MpiClusterArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("transvidio:mpi:MpiCluster", name, None, opts)
        s = args.settings
        topo = Topology(s)
        child = pulumi.ResourceOptions(parent=self)
        self.image = role_image(f"{name}-image", COMPONENT, s, self)
        self.workspace = shared_volume(name, "mpi-workspace", s, COMPONENT, self)
        self.client_key = tls.PrivateKey(f"{name}-client-key", algorithm="ED25519", opts=child)
        self.host_keys = {
            node.hostname: tls.PrivateKey(
                f"{child_name(name, node.hostname)}-host-key", algorithm="ED25519", opts=child
            )
            for node in topo.mpi_nodes
        }
        known_hosts = pulumi.Output.all(*[k.public_key_openssh for k in self.host_keys.values()]).apply(
            lambda keys: render.known_hosts(s, keys)
        )
        uid = SERVICE_UIDS[COMPONENT]
        every_node = [
            config_file(f"{HOME}/.openmpi/mca-params.conf", render.openmpi_mca_params(s)),
            config_file(f"{HOME}/.prte/mca-params.conf", render.prte_mca_params(s)),
        ]
        launcher = [
            config_file(f"{render.MPI_CONF_DIR}/hostfile", render.hostfile(s)),
            config_file("/etc/ssh/ssh_known_hosts", known_hosts),
            secret_file(f"{HOME}/.ssh/id_ed25519", self.client_key.private_key_openssh, uid),
            secret_file(render.secret_path("POSTGRES_PASSWORD"), args.postgres_password, uid),
        ]
        launched = [
            config_file(
                f"{HOME}/.ssh/authorized_keys",
                self.client_key.public_key_openssh.apply(lambda key: render.authorized_keys(s, key)),
            )
        ]
        uploads = VolumeMount(args.uploads_volume, render.UPLOADS_DIR, read_only=True)
        outputs = VolumeMount(args.outputs_volume, render.OUTPUTS_DIR)
        workspace = VolumeMount(self.workspace.name, render.WORKSPACE_DIR)
        runner_env = [f"{k}={v}" for k, v in sorted(render.mpi_runner_environment(s).items())]

        def container(node: Node) -> pulumi.CustomResource:
            host_key = secret_file(
                "/etc/ssh/ssh_host_ed25519_key", self.host_keys[node.hostname].private_key_openssh, ROOT_UID
            )
            master = node.role == "mpi-master"  # the launcher, the job runner and rank 0
            spec = ContainerSpec(
                node=node,
                component=COMPONENT,
                image=self.image.repo_digest,
                healthcheck=["/usr/local/bin/healthcheck.sh"],
                memory_mb=s.mpi.memory_mb,
                millicpus=s.mpi.millicpus,
                envs=[f"MPI_ROLE={node.role}"]
                + ([f"MPI_HOSTFILE={render.MPI_CONF_DIR}/hostfile", *runner_env] if master else []),
                volumes=[workspace, uploads, *([outputs] if master else [])],
                uploads=[*every_node, host_key, *(launcher if master else launched)],
                capabilities=SSHD_CAPABILITIES,
                # MPI launches by name (hostfile, known_hosts) and the runner reaches the
                # PostgreSQL nodes by name: pin them to the fixed addresses so neither waits
                # on, or fails with, the engine's DNS. Workers never reach PostgreSQL.
                extra_hosts=[*topo.mpi_nodes, *(topo.postgres_nodes if master else [])],
            )
            return service_container(name, spec, s, args.networks, self)

        self.workers = [container(node) for node in topo.mpi_workers]
        self.master = container(topo.mpi_master)
        self.master_host = topo.mpi_master.hostname
        self.register_outputs(
            {"master": self.master_host, "workers": [n.hostname for n in topo.mpi_workers], "sshPort": SSH_PORT}
        )
