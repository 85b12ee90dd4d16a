"""The swarm target: a `ContainerSpec` as a Docker Swarm service, its files as swarm configs and secrets.

A node of the stack (a PostgreSQL node, a Redis node, a Sentinel, an MPI node, an etcd member)
is one service with one replica, pinned by a placement constraint to the swarm node its
`Node.swarm_node` names, so its volume (made by that node when the task first starts) stays
with it; a spec with `replicas` is one replicated service spread over the nodes, and one with
`every_node` one task on each node. Files become `docker.ServiceConfig`s and secrets `docker.Secret`s
(on the tasks' tmpfs, never in an environment value), named after their content: swarm configs
and secrets are immutable, so a changed file is a new one and the service rolls to it. Updates
go one task at a time, stop-first for a pinned node (its volume and name are its own) and
start-first for the others, roll back by themselves when a task does not get healthy, and
`converge_config` makes `pulumi up` wait for the outcome.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from typing import Any

import pulumi
import pulumi_docker as docker

from components.container import (
    LOG_OPTS,
    ContainerSpec,
    File,
    Networks,
    VolumeMount,
    child_name,
    duration,
    healthcheck_fields,
    stack_labels,
)
from components.settings import Settings

NODE_LABEL = "transvidio.node"  # the label deploy.swarmNodes names, on each swarm node
MB = 1024 * 1024
NANO_CPUS_PER_MILLICPU = 1_000_000
# Docker allows 64 characters in a config's or secret's name: the readable part, then the digest.
SWARM_NAME_PREFIX_CHARS = 48
DIGEST_CHARS = 12
UPDATE_MONITOR_SECONDS = 15  # a task that fails within this after its update fails the update
CONVERGE_TIMEOUT_SECONDS = 600
RESTART_DELAY_SECONDS = 5


def file_docker_name(settings: Settings, hostname: str, file: File, content: str) -> str:
    """A config's or secret's name: the stack, the node and the file, then a digest of its path and
    content. The digest is of a random secret at least 16 characters long, truncated: it names a
    version, it does not reveal one."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{settings.prefix}-{hostname}-{file.path.rsplit('/', 1)[-1]}")
    digest = hashlib.sha256(file.path.encode() + b"\0" + content.encode()).hexdigest()[:DIGEST_CHARS]
    return f"{base[:SWARM_NAME_PREFIX_CHARS]}-{digest}"


def _base64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _file_fields(file: File) -> dict[str, Any]:
    """Where a config or secret appears in the task, owned and moded as on one host."""
    return {"file_name": file.path, "file_uid": str(file.uid), "file_gid": str(file.uid), "file_mode": file.mode}


def _resource_suffix(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", path).strip("-")


def _files(
    child: str, hostname: str, files: list[File], settings: Settings, parent: pulumi.Resource
) -> tuple[list[docker.ServiceTaskSpecContainerSpecSecretArgs], list[docker.ServiceTaskSpecContainerSpecConfigArgs]]:
    secrets, configs = [], []
    opts = pulumi.ResourceOptions(parent=parent)
    for file in files:
        resource_name = f"{child}-{_resource_suffix(file.path)}"
        content: pulumi.Output[str] = pulumi.Output.from_input(file.content)

        def named(text: str, file: File = file) -> str:
            return file_docker_name(settings, hostname, file, text)

        docker_name = pulumi.Output.unsecret(content.apply(named))
        if file.secret:
            secret = docker.Secret(
                resource_name,
                name=docker_name,
                data=pulumi.Output.secret(file.content).apply(_base64),
                labels=[docker.SecretLabelArgs(label=k, value=v) for k, v in stack_labels(settings).items()],
                opts=opts,
            )
            secrets.append(
                docker.ServiceTaskSpecContainerSpecSecretArgs(
                    secret_id=secret.id, secret_name=secret.name, **_file_fields(file)
                )
            )
        else:
            config = docker.ServiceConfig(
                resource_name,
                name=docker_name,
                data_raw=content,
                labels=[docker.ServiceConfigLabelArgs(label=k, value=v) for k, v in stack_labels(settings).items()],
                opts=opts,
            )
            configs.append(
                docker.ServiceTaskSpecContainerSpecConfigArgs(
                    config_id=config.id, config_name=config.name, **_file_fields(file)
                )
            )
    return secrets, configs


def _mount(mount: VolumeMount, settings: Settings, component: str) -> docker.ServiceTaskSpecContainerSpecMountArgs:
    """A volume made by the node that runs the task, labelled as the stack's; an absolute path is a
    directory every node has (the shared storage)."""
    if isinstance(mount.volume_name, str) and mount.volume_name.startswith("/"):
        return docker.ServiceTaskSpecContainerSpecMountArgs(
            target=mount.container_path, source=mount.volume_name, type="bind", read_only=mount.read_only
        )
    return docker.ServiceTaskSpecContainerSpecMountArgs(
        target=mount.container_path,
        source=mount.volume_name,
        type="volume",
        read_only=mount.read_only,
        volume_options=docker.ServiceTaskSpecContainerSpecMountVolumeOptionsArgs(
            no_copy=mount.read_only or None,
            labels=[
                docker.ServiceTaskSpecContainerSpecMountVolumeOptionsLabelArgs(label=k, value=v)
                for k, v in stack_labels(settings, component=component).items()
            ],
        ),
    )


def _networks(spec: ContainerSpec, networks: Networks) -> list[docker.ServiceTaskSpecNetworksAdvancedArgs]:
    # A replicated service's tasks share its name; a node's service is also known by the node's.
    own = [] if spec.replicas is not None or spec.every_node else [spec.node.hostname]
    attached = []
    if spec.node.on_data:
        attached.append(docker.ServiceTaskSpecNetworksAdvancedArgs(id=networks.data, aliases=own or None))
    if spec.egress and networks.egress is not None:
        attached.append(docker.ServiceTaskSpecNetworksAdvancedArgs(id=networks.egress, aliases=own or None))
    if spec.node.on_edge:
        aliases = [*own, *spec.edge_aliases]
        attached.append(docker.ServiceTaskSpecNetworksAdvancedArgs(id=networks.edge, aliases=aliases or None))
    return attached


def _ports(spec: ContainerSpec, settings: Settings) -> list[docker.ServiceEndpointSpecPortArgs]:
    pairs = [(port.internal, port.external) for port in spec.extra_ports]
    if spec.node.host_port is not None and spec.container_port is not None:
        pairs.insert(0, (spec.container_port, spec.node.host_port))
    return [
        docker.ServiceEndpointSpecPortArgs(
            target_port=internal, published_port=external, protocol="tcp", publish_mode=settings.deploy.publish_mode
        )
        for internal, external in pairs
    ]


# A swarm's DNS knows a task's name only once the task is healthy; for any other name it asks the
# upstream servers, which a task on an internal network cannot reach: glibc then waits 20 s, and
# a Sentinel (one event loop) resolving a peer that is still starting stops answering, fails its
# healthcheck and is restarted. One try of one second each instead (RES_OPTIONS, glibc's resolver).
RESOLVER_OPTIONS = "timeout:1 attempts:1"


def _env(envs: pulumi.Input[Sequence[pulumi.Input[str]]]) -> pulumi.Output[dict[str, str]]:
    """`KEY=value` items as the service's env map, sorted (the same inputs every run), with the
    resolver's options."""

    def as_map(items: Sequence[str]) -> dict[str, str]:
        env = dict(item.split("=", 1) for item in items)
        env["RES_OPTIONS"] = RESOLVER_OPTIONS
        return dict(sorted(env.items()))

    return pulumi.Output.from_input(envs).apply(as_map)  # type: ignore[arg-type]


def swarm_service(
    component_name: str, spec: ContainerSpec, settings: Settings, networks: Networks, parent: pulumi.Resource
) -> docker.Service:
    """The node's service, with the hygiene every role gets on one host, the swarm's way."""
    node = spec.node
    child = child_name(component_name, node.hostname)
    secrets, configs = _files(child, node.hostname, list(spec.uploads), settings, parent)
    pinned = spec.replicas is None and not spec.every_node
    # A pinned node's task must be gone before its successor takes its volume and its name.
    order = "stop-first" if pinned else "start-first"
    mounts = [_mount(volume, settings, spec.component) for volume in spec.volumes]
    if spec.shm_size_mb:
        mounts.append(
            docker.ServiceTaskSpecContainerSpecMountArgs(
                target="/dev/shm",
                type="tmpfs",
                tmpfs_options=docker.ServiceTaskSpecContainerSpecMountTmpfsOptionsArgs(
                    size_bytes=spec.shm_size_mb * MB
                ),
            )
        )
    # One task per node, as a replicated service of one task per node at most rather than a
    # global one: the provider waits for a replicated service to converge, never for a global one.
    replicas = len(settings.deploy.swarm_nodes) if spec.every_node else (spec.replicas or 1)
    mode = docker.ServiceModeArgs(replicated=docker.ServiceModeReplicatedArgs(replicas=replicas))
    labels = stack_labels(settings, component=spec.component, role=node.role)
    ports = _ports(spec, settings)
    return docker.Service(
        child,
        name=node.container_name,
        labels=[docker.ServiceLabelArgs(label=k, value=v) for k, v in labels.items()],
        mode=mode,
        task_spec=docker.ServiceTaskSpecArgs(
            container_spec=docker.ServiceTaskSpecContainerSpecArgs(
                image=spec.image,
                hostname=node.hostname if pinned else None,
                env=_env(spec.envs),
                commands=list(spec.entrypoint) or None,
                args=list(spec.command) or None,
                mounts=mounts or None,
                secrets=secrets or None,
                configs=configs or None,
                # Every task's health is waited on: convergence, and each step of a rolling update.
                healthcheck=docker.ServiceTaskSpecContainerSpecHealthcheckArgs(
                    **healthcheck_fields(spec, watched=True)
                ),
                stop_grace_period=duration(spec.stop_grace_seconds),
                cap_drops=["ALL"],
                cap_adds=sorted(spec.capabilities) or None,
                labels=[docker.ServiceTaskSpecContainerSpecLabelArgs(label=k, value=v) for k, v in labels.items()],
            ),
            networks_advanceds=_networks(spec, networks) or None,
            placement=docker.ServiceTaskSpecPlacementArgs(
                constraints=[f"node.labels.{NODE_LABEL}=={node.swarm_node}"] if pinned else None,
                prefs=None if pinned else [f"spread=node.labels.{NODE_LABEL}"],
                max_replicas=1 if spec.every_node else None,
            ),
            resources=docker.ServiceTaskSpecResourcesArgs(
                limits=docker.ServiceTaskSpecResourcesLimitsArgs(
                    memory_bytes=spec.memory_mb * MB, nano_cpus=spec.millicpus * NANO_CPUS_PER_MILLICPU
                )
            ),
            restart_policy=docker.ServiceTaskSpecRestartPolicyArgs(
                condition="any", delay=duration(RESTART_DELAY_SECONDS)
            ),
            log_driver=docker.ServiceTaskSpecLogDriverArgs(name="json-file", options=LOG_OPTS),
        ),
        endpoint_spec=docker.ServiceEndpointSpecArgs(mode=settings.deploy.endpoint_mode, ports=ports or None),
        update_config=docker.ServiceUpdateConfigArgs(
            parallelism=1,
            order=order,
            failure_action="rollback",
            monitor=duration(UPDATE_MONITOR_SECONDS),
        ),
        rollback_config=docker.ServiceRollbackConfigArgs(
            parallelism=1, order=order, failure_action="pause", monitor=duration(UPDATE_MONITOR_SECONDS)
        ),
        converge_config=docker.ServiceConvergeConfigArgs(delay="1s", timeout=duration(CONVERGE_TIMEOUT_SECONDS)),
        opts=pulumi.ResourceOptions(
            parent=parent,
            depends_on=list(spec.depends_on),
            # A fixed name: the old service must go before its replacement is created.
            delete_before_replace=True,
        ),
    )
