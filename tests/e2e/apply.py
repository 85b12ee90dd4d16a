"""Applies the program's own registrations to a real engine through the Docker API.

`DockerApplyMocks.new_resource` performs what the pulumi-docker provider would do for
each registration (build, network, volume, container with uploads, wait for healthy)
and returns the real outputs; Pulumi's dependency handling orders the calls as
`pulumi up` would. Any input this harness does not implement fails loudly.
"""

from __future__ import annotations

import io
import os
import secrets
import string
import tarfile
import threading
import time
from collections.abc import Iterable
from typing import Any

import docker
import docker.errors
import docker.types
import pulumi
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from components.container import LABEL_PREFIX
from tests.program import PROJECT_DIR, plain

HEALTH_WAIT_SECONDS = float(os.environ.get("E2E_HEALTH_TIMEOUT", "300"))


class ApplyError(RuntimeError):
    """A resource could not be created; names it and shows the tail of its output."""


def _duration_ns(value: str | None) -> int:
    if not value:
        return 0
    units = {"ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000}
    for suffix in ("ms", "s", "m"):
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * units[suffix])
    raise ApplyError(f"unparsable duration {value!r}")


def _host_ip(ip: str | None) -> str:
    """0.0.0.0 means every interface to Docker; netavark 1.4 turns it into a rule that matches
    no packet (`-d 0.0.0.0/32`), so the same meaning is passed as an empty host IP."""
    return "" if ip is None or ip == "0.0.0.0" else ip


def _reject_unknown(kind: str, name: str, inputs: dict[str, Any], known: Iterable[str]) -> None:
    unknown = sorted(set(inputs) - set(known))
    if unknown:
        raise ApplyError(f"{kind} {name}: the e2e harness does not implement input(s) {unknown}")


def is_podman(client: docker.DockerClient) -> bool:
    components = client.version().get("Components") or []
    return any("podman" in str(c.get("Name", "")).lower() for c in components)


def run_healthcheck(client: docker.DockerClient, container: str) -> str:
    """Runs the container's healthcheck now (Podman without systemd never runs it by itself)."""
    if is_podman(client):
        url = f"{client.api.base_url}/v4.0.0/libpod/containers/{container}/healthcheck"
        response = client.api.get(url)
        if response.status_code >= 400:
            return "unhealthy"
        return str(response.json().get("Status", "unhealthy"))
    state = client.api.inspect_container(container)["State"]
    return str(state.get("Health", {}).get("Status", "none"))


def logs_tail(client: docker.DockerClient, container: str, lines: int = 30) -> str:
    try:
        raw = client.api.logs(container, tail=lines)
    except docker.errors.APIError as error:
        return f"(no logs: {error})"
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


def wait_healthy(client: docker.DockerClient, container: str, timeout: float = HEALTH_WAIT_SECONDS) -> float:
    """Seconds until healthy; raises with the container's last log lines otherwise."""
    started = time.monotonic()
    restarts = 0
    while True:
        try:
            inspected = client.api.inspect_container(container)
            state = inspected["State"]
            restarts = int(inspected.get("RestartCount", 0))
            healthy = state.get("Running") and run_healthcheck(client, container) == "healthy"
        except docker.errors.APIError:
            # Podman fails to inspect a container in the middle of a restart: ask again.
            state, healthy = {}, False
        if healthy:
            return time.monotonic() - started
        if state.get("Status") in ("exited", "dead") or restarts > 2:
            raise ApplyError(
                f"container {container} exited (code {state.get('ExitCode')}, {restarts} restarts) before it was "
                "healthy; last logs:\n" + logs_tail(client, container)
            )
        if time.monotonic() - started > timeout:
            raise ApplyError(
                f"container {container} not healthy after {timeout:.0f}s; last logs:\n" + logs_tail(client, container)
            )
        time.sleep(1)


class DockerApplyMocks(pulumi.runtime.Mocks):
    """Mocks that create the real thing; what they return becomes the resource's outputs."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client
        self.lock = threading.Lock()
        # Generated secrets and keys by resource name: a second apply with the same mocks
        # sees the same values, as `pulumi up` would read them back from its state.
        self.generated: dict[str, str] = {}
        self.keys: dict[str, tuple[str, str]] = {}
        # What each container was created with, as Pulumi's state would hold it.
        self.applied: dict[str, dict[str, Any]] = {}
        self.build_seconds: dict[str, float] = {}
        self.created: list[str] = []

    # --- dispatch -------------------------------------------------------------------

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        inputs = plain(args.inputs)
        handler = {
            "docker:index/network:Network": self._network,
            "docker:index/volume:Volume": self._volume,
            "docker:index/image:Image": self._image,
            "docker:index/remoteImage:RemoteImage": self._remote_image,
            "docker:index/container:Container": self._container,
            "random:index/randomPassword:RandomPassword": self._password,
            "tls:index/privateKey:PrivateKey": self._private_key,
        }.get(args.typ)
        if args.typ.startswith("transvidio:"):
            return f"{args.name}-component", dict(args.inputs)
        if handler is None:
            raise ApplyError(f"{args.typ} ({args.name}): the e2e harness does not implement this resource type")
        resource_id, outputs = handler(args.name, inputs)
        with self.lock:
            self.created.append(f"{args.typ}:{args.name}")
        return resource_id, outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
        raise ApplyError(f"the e2e harness does not implement invoke {args.token}")

    # --- generated secrets -----------------------------------------------------------

    def _password(self, name: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        _reject_unknown("RandomPassword", name, inputs, {"length", "special"})
        alphabet = string.ascii_letters + string.digits
        if inputs.get("special"):
            raise ApplyError(f"RandomPassword {name}: special characters are not implemented")
        with self.lock:
            value = self.generated.setdefault(
                name, "".join(secrets.choice(alphabet) for _ in range(int(inputs["length"])))
            )
        return name, {**inputs, "result": pulumi.Output.secret(value)}

    def _private_key(self, name: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        _reject_unknown("PrivateKey", name, inputs, {"algorithm"})
        if inputs["algorithm"] != "ED25519":
            raise ApplyError(f"PrivateKey {name}: only ED25519 is implemented")
        with self.lock:
            if name not in self.keys:
                key = ed25519.Ed25519PrivateKey.generate()
                private = key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
                ).decode()
                public = key.public_key().public_bytes(
                    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
                )
                self.keys[name] = (private, public.decode() + "\n")
            private, public_line = self.keys[name]
        return name, {**inputs, "private_key_openssh": pulumi.Output.secret(private), "public_key_openssh": public_line}

    # --- networks, volumes, images -------------------------------------------------

    def _network(self, name: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        _reject_unknown("Network", name, inputs, {"name", "driver", "internal", "ipamConfigs", "labels"})
        existing = self.client.networks.list(names=[inputs["name"]])
        if existing:  # a second apply: the network is already there
            return str(existing[0].id), inputs
        pools = [docker.types.IPAMPool(subnet=c["subnet"]) for c in inputs.get("ipamConfigs", [])]
        network = self.client.networks.create(
            inputs["name"],
            driver=inputs.get("driver", "bridge"),
            internal=bool(inputs.get("internal")),
            ipam=docker.types.IPAMConfig(pool_configs=pools),
            labels={item["label"]: item["value"] for item in inputs.get("labels", [])},
        )
        return str(network.id), inputs

    def _volume(self, name: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        _reject_unknown("Volume", name, inputs, {"name", "labels"})
        try:  # Docker returns an existing volume of that name; Podman says it exists
            volume = self.client.volumes.get(inputs["name"])
            return str(volume.id), {**inputs, "mountpoint": volume.attrs.get("Mountpoint", "")}
        except docker.errors.NotFound:
            pass
        volume = self.client.volumes.create(
            name=inputs["name"], labels={item["label"]: item["value"] for item in inputs.get("labels", [])}
        )
        return str(volume.id), {**inputs, "mountpoint": volume.attrs.get("Mountpoint", "")}

    def _image(self, name: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        _reject_unknown("Image", name, inputs, {"imageName", "build", "skipPush", "buildOnPreview"})
        build = inputs["build"]
        _reject_unknown("Image build", name, build, {"context", "dockerfile", "args"})
        context = PROJECT_DIR / build["context"]
        dockerfile = os.path.relpath(PROJECT_DIR / build["dockerfile"], context)
        started = time.monotonic()
        output: list[str] = []
        image_id = None
        for chunk in self.client.api.build(
            path=str(context),
            dockerfile=dockerfile,
            tag=inputs["imageName"],
            buildargs=build.get("args", {}),
            rm=True,
            decode=True,
        ):
            if "stream" in chunk:
                output.extend(chunk["stream"].splitlines())
            if "error" in chunk:
                tail = "\n".join([*output[-25:], chunk["error"]])
                raise ApplyError(f"image {name} ({inputs['imageName']}) failed to build; last output:\n{tail}")
            if "aux" in chunk and "ID" in chunk["aux"]:
                image_id = chunk["aux"]["ID"]
        image_id = image_id or self.client.images.get(inputs["imageName"]).id
        self.build_seconds[name] = time.monotonic() - started
        return str(image_id), {**inputs, "repo_digest": image_id, "image_name": inputs["imageName"]}

    def _remote_image(self, name: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        _reject_unknown("RemoteImage", name, inputs, {"name", "keepLocally"})
        try:
            image = self.client.images.get(inputs["name"])
        except docker.errors.ImageNotFound:
            raise ApplyError(
                f"RemoteImage {name}: {inputs['name']} is not present and no registry is reachable"
            ) from None
        return str(image.id), {**inputs, "image_id": image.id}

    # --- containers -------------------------------------------------------------------

    CONTAINER_INPUTS = frozenset(
        {
            "name",
            "hosts",
            "hostname",
            "image",
            "envs",
            "command",
            "entrypoints",
            "networksAdvanced",
            "ports",
            "volumes",
            "uploads",
            "healthcheck",
            "restart",
            "logDriver",
            "logOpts",
            "memory",
            "shmSize",
            "securityOpts",
            "capabilities",
            "labels",
            "wait",
            "waitTimeout",
            "user",
        }
    )

    def _container(self, name: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        _reject_unknown("Container", name, inputs, self.CONTAINER_INPUTS)
        api = self.client.api
        try:
            existing = api.inspect_container(inputs["name"])
        except docker.errors.NotFound:
            existing = None
        if existing is not None:
            # A second apply: unchanged inputs leave the container as it is, as `pulumi up`
            # leaves a resource without a diff; changed ones replace it (delete first:
            # every container has a fixed name).
            if self.applied.get(inputs["name"], inputs) == inputs:
                return str(existing["Id"]), {**inputs, "id": existing["Id"]}
            api.remove_container(existing["Id"], force=True)
            # Podman tears the old container's port forwarding down asynchronously; a new
            # container publishing the same port must not come up before that is done.
            time.sleep(2)
        self.applied[inputs["name"]] = inputs
        networks = inputs.get("networksAdvanced", [])
        health = inputs["healthcheck"]
        _reject_unknown(
            "Container healthcheck", name, health, {"tests", "interval", "timeout", "retries", "startPeriod"}
        )
        ports = inputs.get("ports", [])
        host_config = api.create_host_config(
            restart_policy={"Name": inputs.get("restart", "no")},
            log_config=docker.types.LogConfig(
                type=inputs.get("logDriver", "json-file"), config=inputs.get("logOpts", {})
            ),
            mem_limit=int(inputs["memory"]) * 1024 * 1024 if inputs.get("memory") else None,
            shm_size=int(inputs["shmSize"]) * 1024 * 1024 if inputs.get("shmSize") else None,
            security_opt=inputs.get("securityOpts"),
            cap_drop=inputs.get("capabilities", {}).get("drops"),
            cap_add=inputs.get("capabilities", {}).get("adds"),
            mounts=[
                docker.types.Mount(
                    target=v["containerPath"], source=v["volumeName"], type="volume", read_only=bool(v.get("readOnly"))
                )
                for v in inputs.get("volumes", [])
            ],
            extra_hosts={h["host"]: h["ip"] for h in inputs.get("hosts", [])} or None,
            port_bindings={
                f"{int(p['internal'])}/{p.get('protocol', 'tcp')}": (_host_ip(p.get("ip")), int(p["external"]))
                for p in ports
            },
        )
        first, *others = networks

        def endpoint(net: dict[str, Any]) -> Any:
            return api.create_endpoint_config(aliases=net.get("aliases"), ipv4_address=net.get("ipv4Address"))

        container = api.create_container(
            image=inputs["image"],
            name=inputs["name"],
            hostname=inputs.get("hostname"),
            environment=inputs.get("envs"),
            command=inputs.get("command"),
            entrypoint=inputs.get("entrypoints"),
            user=inputs.get("user"),
            labels={item["label"]: item["value"] for item in inputs.get("labels", [])},
            ports=[(int(p["internal"]), p.get("protocol", "tcp")) for p in ports],
            healthcheck={
                "test": health["tests"],
                "interval": _duration_ns(health.get("interval")),
                "timeout": _duration_ns(health.get("timeout")),
                "retries": int(health.get("retries", 3)),
                "start_period": _duration_ns(health.get("startPeriod")),
            },
            host_config=host_config,
            networking_config=api.create_networking_config({first["name"]: endpoint(first)}),
        )
        container_id = container["Id"]
        for net in others:
            api.connect_container_to_network(
                container_id, net["name"], aliases=net.get("aliases"), ipv4_address=net.get("ipv4Address")
            )
        for upload in inputs.get("uploads", []):
            self._upload(name, container_id, upload)
        api.start(container_id)
        if inputs.get("wait"):
            wait_healthy(self.client, inputs["name"], float(inputs.get("waitTimeout", HEALTH_WAIT_SECONDS)))
        return container_id, {**inputs, "id": container_id}

    @staticmethod
    def _tar(path: str, content: bytes, mode: int, uid: int, gid: int) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode, info.uid, info.gid = len(content), mode, uid, gid
            archive.addfile(info, io.BytesIO(content))
        return buffer.getvalue()

    def _upload(self, name: str, container_id: str, upload: dict[str, Any]) -> None:
        _reject_unknown("Container upload", name, upload, {"file", "content", "permissions", "owner", "group"})
        content = upload["content"].encode()
        mode = int(upload.get("permissions", "0644"), 8)
        data = self._tar(upload["file"], content, mode, int(upload.get("owner", 0)), int(upload.get("group", 0)))
        for attempt in range(3):
            try:
                if self.client.api.put_archive(container_id, "/", data):
                    return
            except docker.errors.APIError as error:
                # Podman 4.3 sometimes drops a copy made while other containers are created
                # ("passing bulk input to subprocess: broken pipe"); a retry succeeds.
                if attempt == 2:
                    raise ApplyError(f"container {name}: upload of {upload['file']} failed: {error}") from error
            time.sleep(0.5)
        raise ApplyError(f"container {name}: upload of {upload['file']} failed")


def teardown(client: docker.DockerClient, stack: str, volumes: bool = True) -> None:
    """Removes everything labelled with the stack, so an apply after a killed run starts clean."""
    label = f"{LABEL_PREFIX}.stack={stack}"
    for container in client.containers.list(all=True, filters={"label": label}):
        for attempt in range(5):
            try:
                container.remove(force=True, v=False)
                break
            except docker.errors.NotFound:
                break
            except docker.errors.APIError:
                # A container caught mid-restart cannot be killed; it can a moment later.
                if attempt == 4:
                    raise
                time.sleep(1)
    for network in client.networks.list(filters={"label": label}):
        network.remove()
    if volumes:
        for volume in client.volumes.list(filters={"label": label}):
            volume.remove(force=True)
