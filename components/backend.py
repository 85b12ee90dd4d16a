"""BackendPool: the application servers behind nginx."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import pulumi
import pulumi_docker as docker

from components import render
from components.container import (
    SERVICE_UIDS,
    ContainerSpec,
    Networks,
    VolumeMount,
    role_image,
    secret_file,
    service_container,
    shared_volume,
)
from components.settings import Settings
from components.topology import BACKEND_PORT, Node, Topology

COMPONENT = "backend"


@dataclass(frozen=True)
class BackendPoolArgs:
    settings: Settings
    networks: Networks
    postgres_password: pulumi.Input[str]
    redis_password: pulumi.Input[str]
    secret_key: pulumi.Input[str]
    api_tokens: Mapping[str, pulumi.Input[str]]  # token name -> token
    depends_on: list[pulumi.Resource]


class BackendPool(pulumi.ComponentResource):
    """Deploys N backends on both networks, each with the same env contract.

    The image is built from images/backend, or is the user's (`images.backend`). The
    env contract is `render.backend_environment` plus four secret files: the database and
    Redis passwords of the application's own users, the secret key that signs result
    links, and the API tokens' hashes (never the tokens). The pool owns the shared uploads
    and outputs volumes (the MPI nodes mount uploads read-only and the master outputs,
    nginx serves outputs read-only); every backend answers /health.
    """

    members: list[Node]

    def __init__(self, name: str, args: BackendPoolArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("transvidio:backend:BackendPool", name, None, opts)
        s = args.settings
        if s.images.backend and s.deploy.swarm:
            image: pulumi.Input[str] = s.images.backend  # every node pulls it from its registry
        elif s.images.backend:
            remote = docker.RemoteImage(
                f"{name}-image", name=s.images.backend, keep_locally=True, opts=pulumi.ResourceOptions(parent=self)
            )
            image = remote.image_id
        else:
            image = role_image(f"{name}-image", COMPONENT, s, self).repo_digest
        secrets = {
            "API_TOKENS": pulumi.Output.all(**args.api_tokens).apply(render.api_tokens_file),
            "POSTGRES_PASSWORD": args.postgres_password,
            "REDIS_PASSWORD": args.redis_password,
            "SECRET_KEY": args.secret_key,
        }
        assert sorted(secrets) == sorted(render.BACKEND_SECRET_FILES)
        uid = SERVICE_UIDS[COMPONENT]
        secret_files = [secret_file(render.secret_path(k), v, uid) for k, v in sorted(secrets.items())]
        envs = [f"{k}={v}" for k, v in sorted(render.backend_environment(s).items())]
        self.uploads_volume = shared_volume(name, "uploads", s, COMPONENT, self)
        self.outputs_volume = shared_volume(name, "outputs", s, COMPONENT, self)
        topo = Topology(s)
        self.members = topo.backends
        # The hosts the env contract names, pinned to their fixed addresses: a lookup never
        # waits on the engine's DNS while a container restarts.
        pinned = [*topo.postgres_nodes, topo.mpi_master]
        # On a swarm, one replicated service spread over the nodes; on one host, a container each.
        swarm = s.deploy.swarm
        nodes = (
            [dataclasses.replace(self.members[0], hostname=COMPONENT, container_name=f"{s.prefix}-{COMPONENT}")]
            if swarm
            else self.members
        )
        self.containers = [
            service_container(
                name,
                ContainerSpec(
                    node=node,
                    component=COMPONENT,
                    image=image,
                    healthcheck=["python3", "/usr/local/bin/healthcheck.py"],
                    memory_mb=s.backend.memory_mb,
                    millicpus=s.backend.millicpus,
                    envs=envs,
                    uploads=secret_files,
                    volumes=[
                        VolumeMount(self.uploads_volume.name, render.UPLOADS_DIR),
                        VolumeMount(self.outputs_volume.name, render.OUTPUTS_DIR),
                    ],
                    depends_on=args.depends_on,
                    extra_hosts=pinned,
                    edge_aliases=[render.BACKENDS_ALIAS],  # how nginx finds the pool
                    replicas=s.backend.replica_count if swarm else None,
                ),
                s,
                args.networks,
                self,
            )
            for node in nodes
        ]
        self.register_outputs({"members": [m.hostname for m in self.members], "port": BACKEND_PORT})
