"""What every container of the stack shares: one spec, one helper per target, not copies.

A `ContainerSpec` says what a role's container is (image, command, env, files, volumes,
ports, healthcheck, limits, placement); `service_container` turns it into the target's
resources: here a `docker.Container` with the hygiene every role gets (healthcheck that
replaces on change, restart policy, log rotation, memory limit, no-new-privileges, dropped
capabilities, labels, networks with fixed addresses, delete-before-replace for fixed
names), or on a swarm a `docker.Service` (components/swarm.py). `role_image` builds a
role's image from images/<role>; `config_file` and `secret_file` make the files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_docker as docker

from components.settings import Settings, provider_cpus
from components.topology import Node

# Fixed uids the images create their service users with (passed as build args), so
# the stack can upload secrets owned by them.
SERVICE_UIDS: dict[str, int] = {"postgres": 10001, "redis": 10002, "mpi": 10010, "backend": 10010, "nginx": 33}
ROOT_UID = 0

LOG_OPTS = {"max-file": "3", "max-size": "10m"}
HEALTHCHECK_INTERVAL_SECONDS = 5
HEALTHCHECK_TIMEOUT_SECONDS = 4
HEALTHCHECK_RETRIES = 5
# What nothing waits on (on one host, every container but those `pulumi up` waits for) is
# checked at Docker's default pace. Each check is an exec: 21 containers checked every 5 s
# took a fifth of a core of a 2-core host (the engine's work and the checks' own), which the
# MPI ranks then could not have. Unhealthy still shows within a minute.
UNWATCHED_HEALTHCHECK_INTERVAL_SECONDS = 30
UNWATCHED_HEALTHCHECK_RETRIES = 2
RESTART_POLICY = "unless-stopped"
LABEL_PREFIX = "io.transvidio"


@dataclass(frozen=True)
class Networks:
    """The stack's networks, as the target refers to them: by Docker name, or on a swarm by id
    (egress only when something needs a route out)."""

    edge: pulumi.Input[str]
    data: pulumi.Input[str]
    egress: pulumi.Input[str] | None = None


@dataclass(frozen=True)
class VolumeMount:
    volume_name: pulumi.Input[str]  # a volume's name; an absolute path is a directory on the host (a bind)
    container_path: str
    read_only: bool = False


@dataclass(frozen=True)
class File:
    """A file a container gets: a rendered config, or a secret readable by its owner only.
    A single host uploads it into the container; a swarm makes it a config or a secret."""

    path: str
    content: pulumi.Input[str]
    mode: int
    uid: int
    secret: bool

    def upload(self) -> docker.ContainerUploadArgs:
        return docker.ContainerUploadArgs(
            file=self.path,
            content=self.content,
            permissions=f"0{self.mode:o}",
            owner=str(self.uid),
            group=str(self.uid),
        )


@dataclass(frozen=True)
class ContainerSpec:
    """One role's container: what differs between roles. The rest is the helper's."""

    node: Node
    component: str
    image: pulumi.Input[str]
    healthcheck: Sequence[str]
    memory_mb: int
    millicpus: int
    container_port: int | None = None  # published as node.host_port when that is set
    envs: pulumi.Input[Sequence[pulumi.Input[str]]] = ()
    entrypoint: Sequence[str] = ()
    command: Sequence[str] = ()
    volumes: Sequence[VolumeMount] = ()
    uploads: Sequence[File] = ()
    extra_ports: Sequence[docker.ContainerPortArgs] = ()
    capabilities: Sequence[str] = ()  # added back after dropping ALL
    extra_hosts: Sequence[Node] = ()  # written to /etc/hosts: no DNS needed to reach them
    edge_aliases: Sequence[str] = ()  # names shared with other containers on the edge network
    egress: bool = False  # also on the egress network (a route out), when the stack has one
    shm_size_mb: int | None = None
    start_period_seconds: int = 30
    # How long a stop (replacement, scale-down, destroy) waits for a clean shutdown before
    # SIGKILL: without it the provider kills at once.
    stop_grace_seconds: int = 10
    wait: bool = False  # block `pulumi up` until healthy: for what others depend on
    depends_on: Sequence[pulumi.Resource] = field(default_factory=list)
    # On a swarm: tasks of one replicated service (the node names its first; no placement
    # pin), instead of one service per node.
    replicas: int | None = None
    every_node: bool = False  # on a swarm: one task on every node


def duration(seconds: int) -> str:
    """A duration as the provider reads it back (Go's time.Duration.String(): "1m30s", not
    "90s"), so the next `pulumi up` sees no difference."""
    if seconds < 0:
        raise ValueError(f"negative duration {seconds}")
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def volume_mount(mount: VolumeMount) -> docker.ContainerMountArgs:
    """A named volume. A read-only consumer never copies its image's directory into an empty
    volume (Docker's copy-up, owner included): the writers' images decide the owner, not the
    container that happens to mount it first."""
    return docker.ContainerMountArgs(
        target=mount.container_path,
        source=mount.volume_name,
        type="volume",
        read_only=mount.read_only,
        volume_options=docker.ContainerMountVolumeOptionsArgs(no_copy=True) if mount.read_only else None,
    )


def stack_labels(settings: Settings, **extra: str) -> dict[str, str]:
    """The io.transvidio.* labels of every resource of the stack: its project and stack, and
    what `extra` adds (component, role), in a stable order."""
    values = {"project": settings.project, "stack": settings.stack, **extra}
    return {f"{LABEL_PREFIX}.{key}": values[key] for key in sorted(values)}


def labels(settings: Settings, component: str, role: str) -> list[docker.ContainerLabelArgs]:
    return [
        docker.ContainerLabelArgs(label=k, value=v)
        for k, v in stack_labels(settings, component=component, role=role).items()
    ]


def _networks(spec: ContainerSpec, networks: Networks) -> list[docker.ContainerNetworksAdvancedArgs]:
    attached = []
    if spec.node.on_data:
        attached.append(
            docker.ContainerNetworksAdvancedArgs(
                name=networks.data, aliases=[spec.node.hostname], ipv4_address=spec.node.data_ip
            )
        )
    if spec.egress and networks.egress is not None:
        # No fixed address: nothing inside the stack reaches a node through this network.
        attached.append(docker.ContainerNetworksAdvancedArgs(name=networks.egress, aliases=[spec.node.hostname]))
    if spec.node.on_edge:
        attached.append(
            docker.ContainerNetworksAdvancedArgs(
                name=networks.edge,
                aliases=[spec.node.hostname, *spec.edge_aliases],
                ipv4_address=spec.node.edge_ip,
            )
        )
    return attached


def _ports(spec: ContainerSpec, settings: Settings) -> list[docker.ContainerPortArgs]:
    ports = list(spec.extra_ports)
    if spec.node.host_port is not None and spec.container_port is not None:
        ports.insert(
            0,
            docker.ContainerPortArgs(
                internal=spec.container_port,
                external=spec.node.host_port,
                ip=settings.network.publish_host_ip,
                protocol="tcp",
            ),
        )
    return ports


def healthcheck_fields(spec: ContainerSpec, watched: bool) -> dict[str, Any]:
    """The healthcheck every target gives a role: its command, and the stack's timing, every
    5 s when something waits for the role to be healthy (`watched`: `pulumi up`, or a swarm's
    convergence and rolling updates), else every 30 s."""
    interval, retries = (
        (HEALTHCHECK_INTERVAL_SECONDS, HEALTHCHECK_RETRIES)
        if watched
        else (UNWATCHED_HEALTHCHECK_INTERVAL_SECONDS, UNWATCHED_HEALTHCHECK_RETRIES)
    )
    return {
        "tests": ["CMD", *spec.healthcheck],
        "interval": duration(interval),
        "timeout": duration(HEALTHCHECK_TIMEOUT_SECONDS),
        "retries": retries,
        "start_period": duration(spec.start_period_seconds),
    }


def child_name(component_name: str, hostname: str) -> str:
    """A child's resource name: the component's name, then the node (no stutter)."""
    if hostname == component_name or hostname.startswith(component_name + "-"):
        return hostname
    return f"{component_name}-{hostname}"


def in_turn(
    settings: Settings, dependencies: Sequence[pulumi.Resource], previous: pulumi.Resource | None
) -> list[pulumi.Resource]:
    """What a tier's node waits for: its `dependencies` and, on a swarm, the tier's node before it.

    Pulumi updates resources that do not depend on each other at once, and a swarm updates a
    service in place by restarting its task: a tier's pinned nodes updated together (a rotated
    secret, a new image) would all be down at once, its quorum or its every replica gone. In
    turn, each waits for the one before it to converge. On one host the tiers keep their
    secrets in credential stores and are created side by side.
    """
    chained = [previous] if previous is not None and settings.deploy.swarm else []
    return [*dependencies, *(node for node in chained if node not in dependencies)]


def service_container(
    component_name: str, spec: ContainerSpec, settings: Settings, networks: Networks, parent: pulumi.Resource
) -> pulumi.CustomResource:
    """The node's container, or on a swarm its service, with the stack's hygiene applied."""
    if settings.deploy.swarm:
        # Imported here: the swarm target builds on this module's spec and helpers.
        from components.swarm import swarm_service

        return swarm_service(component_name, spec, settings, networks, parent)
    return _container(component_name, spec, settings, networks, parent)


def _container(
    component_name: str, spec: ContainerSpec, settings: Settings, networks: Networks, parent: pulumi.Resource
) -> docker.Container:
    attached = _networks(spec, networks)
    return docker.Container(
        child_name(component_name, spec.node.hostname),
        name=spec.node.container_name,
        hostname=spec.node.hostname,
        image=spec.image,
        envs=spec.envs or None,
        entrypoints=list(spec.entrypoint) or None,
        command=list(spec.command) or None,
        networks_advanced=attached or None,
        # A node on neither network has no network at all (not Docker's default bridge).
        network_mode=None if attached else "none",
        ports=_ports(spec, settings) or None,
        mounts=[volume_mount(v) for v in spec.volumes] or None,
        uploads=[file.upload() for file in spec.uploads] or None,
        hosts=[docker.ContainerHostArgs(host=n.hostname, ip=str(n.data_ip)) for n in spec.extra_hosts if n.data_ip]
        or None,
        healthcheck=docker.ContainerHealthcheckArgs(**healthcheck_fields(spec, watched=spec.wait)),
        restart=RESTART_POLICY,
        log_driver="json-file",
        log_opts=LOG_OPTS,
        memory=spec.memory_mb,
        # Swap equal to memory: no swap. Set explicitly, so the provider's in-place update
        # sends both (Docker refuses a memory limit above the old swap limit) and the value
        # read back matches.
        memory_swap=spec.memory_mb,
        cpus=provider_cpus(spec.millicpus),
        destroy_grace_seconds=spec.stop_grace_seconds,
        shm_size=spec.shm_size_mb,
        security_opts=["no-new-privileges:true"],
        capabilities=docker.ContainerCapabilitiesArgs(drops=["ALL"], adds=sorted(spec.capabilities) or None),
        labels=labels(settings, spec.component, spec.node.role),
        wait=spec.wait,
        wait_timeout=300 if spec.wait else None,
        opts=pulumi.ResourceOptions(
            parent=parent,
            depends_on=list(spec.depends_on),
            # Fixed names and ports: the old container must go before the new one starts.
            delete_before_replace=True,
            # The provider "updates" a healthcheck in place without changing the container.
            replace_on_changes=["healthcheck"],
        ),
    )


# Roles whose image also takes the shared job pipeline (images/common): their build
# context is images/, the others' only their own directory.
SHARED_CONTEXT_ROLES = frozenset({"backend", "mpi"})


def role_image(name: str, role: str, settings: Settings, parent: pulumi.Resource) -> docker.Image:
    """Builds images/<role>/Dockerfile FROM the configured base; containers use its id. For a
    swarm it is pushed to images.registry, and services use it by digest: every node pulls
    exactly the image that was built."""
    registry = f"{settings.images.registry}/" if settings.deploy.swarm else ""
    return docker.Image(
        name,
        image_name=f"{registry}{settings.prefix}-{role}:latest",
        build=docker.DockerBuildArgs(
            context="images" if role in SHARED_CONTEXT_ROLES else f"images/{role}",
            dockerfile=f"images/{role}/Dockerfile",
            args={"BASE_IMAGE": settings.images.base, "SERVICE_UID": str(SERVICE_UIDS[role])},
        ),
        skip_push=not settings.deploy.swarm,
        opts=pulumi.ResourceOptions(parent=parent),
    )


@dataclass(frozen=True)
class NodeVolume:
    """On a swarm, a node's volume is made by the node that runs the task (the service names it),
    not by the program on the manager; it outlives the service, as a retained volume does."""

    name: str


def data_volume(
    component_name: str, volume: str, settings: Settings, component: str, parent: pulumi.Resource
) -> docker.Volume | NodeVolume:
    """A named volume that outlives `pulumi destroy` and container replacement.

    Docker's volume create returns an existing volume of the same name, so a stack
    brought up again after a destroy finds its data where it left it.
    """
    if settings.deploy.swarm:
        return NodeVolume(f"{settings.prefix}-{volume}")
    return _volume(component_name, volume, settings, component, parent, retain=True)


def shared_volume(
    component_name: str, volume: str, settings: Settings, component: str, parent: pulumi.Resource
) -> docker.Volume | NodeVolume:
    """A volume several nodes mount. On one host, a named volume; on a swarm, where the nodes
    mounting it run anywhere, a directory of the shared storage every node mounts
    (deploy.sharedPath)."""
    if settings.deploy.swarm:
        return NodeVolume(f"{settings.deploy.shared_path}/{settings.prefix}-{volume}")
    return data_volume(component_name, volume, settings, component, parent)


def _volume(
    component_name: str, volume: str, settings: Settings, component: str, parent: pulumi.Resource, retain: bool
) -> docker.Volume:
    return docker.Volume(
        child_name(component_name, volume),
        name=f"{settings.prefix}-{volume}",
        labels=[
            docker.VolumeLabelArgs(label=k, value=v) for k, v in stack_labels(settings, component=component).items()
        ],
        opts=pulumi.ResourceOptions(parent=parent, retain_on_delete=retain),
    )


# Where a credentials writer receives its files; it copies them into the store's volume,
# which the readers mount at SECRETS_DIR.
CREDENTIALS_INBOX = "/etc/transvidio/credentials"


@dataclass(frozen=True)
class CredentialStore:
    """A tier's secret files, kept where its nodes read them without being replaced. On a swarm,
    the files themselves (swarm secrets, which a rotation rolls to every reader)."""

    volume: docker.Volume | None
    writer: pulumi.CustomResource | None
    secrets: Mapping[str, pulumi.Input[str]]  # on a swarm: name -> value, each readable only by `uid`
    uid: int

    def mounts(self, path: str) -> list[VolumeMount]:
        """The store's volume, for a reader to mount at `path` (on one host)."""
        return [VolumeMount(self.volume.name, path, read_only=True)] if self.volume is not None else []

    def files(self, path: str) -> list[File]:
        """The secrets themselves under `path` (on a swarm)."""
        return [secret_file(f"{path}/{name}", value, self.uid) for name, value in sorted(self.secrets.items())]

    @property
    def before(self) -> list[pulumi.Resource]:
        """What a reader waits for."""
        return [self.writer] if self.writer is not None else []


def credentials_store(
    component_name: str,
    node: Node,
    component: str,
    image: pulumi.Input[str],
    secrets: Mapping[str, pulumi.Input[str]],
    uid: int,
    settings: Settings,
    networks: Networks,
    parent: pulumi.Resource,
) -> CredentialStore:
    """A volume holding `secrets` (file name -> value, each readable only by `uid`) and the
    small container that writes them there, with no network. A changed secret replaces only the
    writer; the readers, which mount the volume read-only, see the new file and apply it
    live (their images' entrypoints watch the store's `.generation`)."""
    if settings.deploy.swarm:
        return CredentialStore(None, None, secrets, uid)
    # Not retained: secrets do not outlive the stack; the writer fills it again at every start.
    volume = _volume(component_name, node.hostname, settings, component, parent, retain=False)
    inbox = [secret_file(f"{CREDENTIALS_INBOX}/{name}", value, uid) for name, value in sorted(secrets.items())]
    writer = service_container(
        component_name,
        ContainerSpec(
            node=node,
            component=component,
            image=image,
            healthcheck=["/usr/local/bin/credentials.sh", "check"],
            memory_mb=CREDENTIALS_WRITER_MEMORY_MB,
            millicpus=CREDENTIALS_WRITER_MILLICPUS,
            entrypoint=["/usr/local/bin/credentials.sh", "serve"],
            volumes=[VolumeMount(volume.name, CREDENTIALS_STORE_DIR)],
            uploads=inbox,
            wait=True,  # the readers start once their secrets are in place
        ),
        settings,
        networks,
        parent,
    )
    return CredentialStore(volume, writer, {}, uid)


CREDENTIALS_STORE_DIR = "/srv/credentials"  # the volume, as the writer mounts it
CREDENTIALS_WRITER_MEMORY_MB = 32
CREDENTIALS_WRITER_MILLICPUS = 100


def config_file(path: str, content: pulumi.Input[str]) -> File:
    """A rendered, non-secret file, readable by the service."""
    return File(path, content, mode=0o644, uid=ROOT_UID, secret=False)


def secret_file(path: str, content: pulumi.Input[str], uid: int) -> File:
    """A secret, readable only by the service user."""
    return File(path, pulumi.Output.secret(content), mode=0o400, uid=uid, secret=True)
