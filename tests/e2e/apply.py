"""Applies the program's own registrations to a real engine, the way `pulumi up` does.

`DockerApplyMocks.new_resource` is called by Pulumi's runtime once per registration, in
dependency order and in parallel where the graph allows, as the engine would call the
provider. It keeps a state per stack, as Pulumi's state holds it: each resource's inputs
and what the provider read back after the last operation. On a later apply the new
inputs are diffed against that state with the provider's own rules (tests/e2e/provider.py),
then the resource is left alone, updated in place, or replaced (delete first where the
program asks, taking along the dependents whose replace-on-change inputs depend on it);
what the program no longer declares is deleted, dependents first, at the end.
Without `refresh`, nothing live is read: a container removed by hand stays removed, as
with `pulumi up`; with it, every known resource is read first, as `pulumi up --refresh`.
A container or network the state does not know, but the engine has, fails the apply.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import functools
import hashlib
import io
import os
import pathlib
import secrets
import string
import tarfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors
import docker.types
import pulumi
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from components.container import LABEL_PREFIX
from tests.e2e import provider, swarm_target
from tests.program import PROJECT_DIR, Evaluation, evaluate, plain

HEALTH_WAIT_SECONDS = float(os.environ.get("E2E_HEALTH_TIMEOUT", "300"))

Key = tuple[str, str]  # (type, name): the program gives every resource a unique name

CONTAINER = "docker:index/container:Container"
NETWORK = "docker:index/network:Network"
VOLUME = "docker:index/volume:Volume"
IMAGE = "docker:index/image:Image"
REMOTE_IMAGE = "docker:index/remoteImage:RemoteImage"
PASSWORD = "random:index/randomPassword:RandomPassword"
PRIVATE_KEY = "tls:index/privateKey:PrivateKey"
SERVICE = "docker:index/service:Service"
SECRET = "docker:index/secret:Secret"
SERVICE_CONFIG = "docker:index/serviceConfig:ServiceConfig"


class ApplyError(RuntimeError):
    """A resource could not be created; names it and shows the tail of its output."""


class InitializationError(ApplyError):
    """The resource exists but did not become ready (a container with `wait` never healthy).

    The provider set the container's ID before waiting, so the bridge hands Pulumi a partial
    state: the engine keeps the resource with its initialization errors (and on the next
    `pulumi up` updates it, even with no change: pulumi/pkg/resource/deploy/step_generator.go,
    "If resource was unchanged, but there were initialization errors, generate an empty
    update step").
    """

    def __init__(self, message: str, resource_id: str, outputs: dict[str, Any]) -> None:
        super().__init__(message)
        self.resource_id = resource_id
        self.outputs = outputs


def _host_ip(ip: str | None) -> str:
    """0.0.0.0 means every interface to Docker; netavark 1.4 turns it into a rule that matches
    no packet (`-d 0.0.0.0/32`), so on Podman the same meaning is passed as an empty host IP."""
    return "" if ip is None or ip == "0.0.0.0" else ip


def _reject_unknown(kind: str, name: str, inputs: dict[str, Any], known: Iterable[str]) -> None:
    unknown = sorted(set(inputs) - set(known))
    if unknown:
        raise ApplyError(f"{kind} {name}: the e2e harness does not implement input(s) {unknown}")


def is_podman(client: docker.DockerClient) -> bool:
    components = client.version().get("Components") or []
    return any("podman" in str(c.get("Name", "")).lower() for c in components)


def run_healthcheck(client: docker.DockerClient, container: str) -> str:
    """The container's health now (Podman without systemd never runs it by itself: run it)."""
    if is_podman(client):
        url = f"{client.api.base_url}/v4.0.0/libpod/containers/{container}/healthcheck"
        response = client.api.get(url)
        if response.status_code >= 400:
            return "unhealthy"
        return str(response.json().get("Status", "unhealthy"))
    state = client.api.inspect_container(container)["State"]
    return str(state.get("Health", {}).get("Status", "none"))


def seconds_running(state: dict[str, Any]) -> float:
    """How long the container has run, from its inspect `State` (StartedAt: RFC 3339 with
    nanoseconds; Python reads microseconds)."""
    whole, _, fraction = str(state["StartedAt"]).rstrip("Z").partition(".")
    started = datetime.datetime.fromisoformat(f"{whole}.{(fraction + '000000')[:6]}+00:00")
    return (datetime.datetime.now(datetime.UTC) - started).total_seconds()


def passes_its_healthcheck(client: docker.DockerClient, container: str, inspected: dict[str, Any]) -> bool:
    """Whether the container's own healthcheck, as the engine holds it (`inspected`: the
    container's inspect), passes when run now.

    Docker runs a container's first check one interval after its start (30 s for what
    nothing waits on): a test that needs the container ready runs the same command at once,
    in the container, as the engine would, within the check's own timeout."""
    health = inspected["Config"].get("Healthcheck") or {}
    test = list(health.get("Test") or [])
    if test[:1] == ["CMD"]:
        command = test[1:]
    elif test[:1] == ["CMD-SHELL"]:
        command = ["/bin/sh", "-c", test[1]]
    else:
        return False
    seconds = max(1, int(health.get("Timeout", 30 * 10**9)) // 10**9)
    exec_id = client.api.exec_create(container, ["timeout", str(seconds), *command])["Id"]
    client.api.exec_start(exec_id)
    return bool(client.api.exec_inspect(exec_id).get("ExitCode") == 0)


def logs_tail(client: docker.DockerClient, container: str, lines: int = 30) -> str:
    try:
        raw = client.api.logs(container, tail=lines)
    except docker.errors.APIError as error:
        return f"(no logs: {error})"
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


def wait_healthy(
    client: docker.DockerClient, container: str, timeout: float = HEALTH_WAIT_SECONDS, check_now: bool = False
) -> float:
    """Seconds until healthy; raises with the container's last log lines otherwise. With
    `check_now`, healthy also when the container's own healthcheck passes run now (ready for
    a test), not only once the engine's timer has run it (what `pulumi up` waits for)."""
    started = time.monotonic()
    restarts = 0
    while True:
        try:
            inspected = client.api.inspect_container(container)
            state = inspected["State"]
            restarts = int(inspected.get("RestartCount", 0))
            healthy = bool(state.get("Running")) and (
                run_healthcheck(client, container) == "healthy"
                or (check_now and not is_podman(client) and passes_its_healthcheck(client, container, inspected))
            )
        except docker.errors.APIError:
            # Podman fails to inspect a container in the middle of a restart: ask again.
            state, healthy = {}, False
        if healthy:
            return time.monotonic() - started
        # After a few restarts it will not get healthy: report it once seen stopped, with the
        # exit code of that run (a running container's inspect says 0). The engine's restart
        # delay doubles each time, so polling faster now catches the stopped moment.
        # (Docker reports a container waiting to be restarted as Running and Restarting.)
        stopped = bool(state.get("Restarting")) or state.get("Status") in ("restarting", "exited", "dead")
        if state.get("Status") in ("exited", "dead") or (restarts > 2 and stopped):
            raise ApplyError(
                f"container {container} exited (code {state.get('ExitCode')}, {restarts} restarts) before it was "
                "healthy; last logs:\n" + logs_tail(client, container)
            )
        if time.monotonic() - started > timeout:
            raise ApplyError(
                f"container {container} not healthy after {timeout:.0f}s; last logs:\n" + logs_tail(client, container)
            )
        time.sleep(0.2 if restarts > 2 else 1)


def remove_container(removal: Callable[[], None]) -> None:
    """Runs a container's removal; one already gone is fine, one caught mid-restart (which
    Podman cannot stop or kill) or already being removed (by a Swarm node's agent, for its
    service) is tried again a moment later, until it is gone."""
    for attempt in range(10):
        try:
            removal()
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError:
            if attempt == 9:
                raise
            time.sleep(1)


def tar_file(path: str, content: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> bytes:
    """A one-file tar archive, as the provider builds for an upload."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(path.lstrip("/"))
        info.size, info.mode, info.uid, info.gid = len(content), mode, uid, gid
        archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


# --- the engine's part: state, plan -------------------------------------------------------


@dataclass
class Resource:
    """One resource as Pulumi's state holds it."""

    type: str
    name: str
    id: str
    inputs: dict[str, Any]  # the program's inputs at the last operation
    state: dict[str, Any]  # what the provider holds after it (read back, or planned after an update)
    outputs: dict[str, Any]  # what the program sees
    dependencies: set[Key] = field(default_factory=set)
    property_dependencies: dict[str, set[Key]] = field(default_factory=dict)
    delete_before_replace: bool = False
    retain_on_delete: bool = False
    init_errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class Step:
    op: str  # create, update, replace, delete
    type: str
    name: str
    attributes: tuple[str, ...] = ()

    def __str__(self) -> str:
        symbol = {"create": "+", "update": "~", "replace": "+-", "delete": "-"}[self.op]
        detail = f" [{', '.join(self.attributes)}]" if self.attributes else ""
        return f"  {symbol} {self.op:<7} {self.type.rsplit(':', 1)[-1]} {self.name}{detail}"


@dataclass
class Plan:
    stack: str
    steps: list[Step] = field(default_factory=list)
    unchanged: int = 0

    def counts(self) -> dict[str, int]:
        return {op: sum(1 for s in self.steps if s.op == op) for op in ("create", "update", "replace", "delete")}

    def names(self, op: str, type_: str = CONTAINER) -> set[str]:
        return {s.name for s in self.steps if s.op == op and s.type == type_}

    def __str__(self) -> str:
        counts = ", ".join(f"{n} to {op}" for op, n in self.counts().items())
        return "\n".join([f"plan ({self.stack}): {counts}, {self.unchanged} unchanged", *map(str, self.steps)])


def _key_of_urn(urn: str) -> Key:
    """urn:pulumi:STACK::PROJECT::[parent$]TYPE::NAME -> (TYPE, NAME)."""
    _, _, qualified_type, name = urn.split("::", 3)
    return qualified_type.rsplit("$", 1)[-1], name


def _context_hash(context: pathlib.Path, dockerfile: str, args: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in context.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(context)).encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(dockerfile.encode() + repr(sorted(args.items())).encode())
    return digest.hexdigest()


class DockerApplyMocks(pulumi.runtime.Mocks):
    """The provider and the engine: what new_resource returns becomes the resource's outputs."""

    def __init__(self, client: docker.DockerClient, stack: str = "") -> None:
        self.client = client
        self.stack = stack
        self.podman = is_podman(client)
        self.lock = threading.Lock()
        self.state: dict[Key, Resource] = {}
        self.build_seconds: dict[str, float] = {}
        self.refresh = False
        self.plan = Plan(stack)
        self._registering: dict[Key, dict[str, Any]] = {}
        self._declared: set[Key] = set()
        self._replace_dependents: set[Key] = set()
        # What a create-before-delete replacement left behind: deleted at the end of the
        # apply, once its dependents use the replacement (Pulumi's step generator condemns the
        # old resource and deletes it with the deletes, in GenerateDeletes). A swarm secret or
        # config still used by a service cannot be removed before that service is updated.
        self._replaced: list[Resource] = []
        # Steps in flight, and the first failure: after one, the engine starts no new step
        # and waits for those in flight (it does not continue on error by default).
        self._steps = threading.Condition()
        self._in_flight = 0
        self.failure: str | None = None
        # Called with a resource's id right after its create, before any dependent step:
        # what a test needs in place before the stack uses it (an endpoint outside the stack).
        self.on_created: dict[str, Callable[[str], None]] = {}
        self.handlers = {
            NETWORK: self._network,
            VOLUME: self._volume,
            IMAGE: self._image,
            REMOTE_IMAGE: self._remote_image,
            CONTAINER: self._container,
            PASSWORD: self._password,
            PRIVATE_KEY: self._private_key,
            SERVICE: self._service,
            SECRET: self._secret,
            SERVICE_CONFIG: self._service_config,
        }

    # --- one apply ------------------------------------------------------------------------

    def begin(self, refresh: bool = False) -> None:
        self.wait_idle()
        self.failure = None
        self.refresh = refresh
        self.plan = Plan(self.stack)
        self._registering.clear()
        self._declared.clear()
        self._replace_dependents.clear()
        # What an apply that failed left pending deletion goes first, as Pulumi deletes a
        # snapshot's pending deletes before the next plan (tests/integration/double_pending_delete).
        while self._replaced:
            self._delete(self._replaced.pop())

    def registering(
        self,
        type_: str,
        name: str,
        dependencies: list[str],
        property_dependencies: dict[str, list[str]],
        options: dict[str, Any],
    ) -> None:
        """What the engine knows of a registration besides its inputs (called by the monitor)."""
        with self.lock:
            self._registering[(type_, name)] = {
                "dependencies": {_key_of_urn(u) for u in dependencies},
                "property_dependencies": {k: {_key_of_urn(u) for u in v} for k, v in property_dependencies.items()},
                **options,
            }

    def finish(self) -> Plan:
        """Deletes what the program no longer declares, dependents first, then what
        replacements left behind."""
        gone = {key for key in self.state if key not in self._declared}
        if self.refresh:
            for key in sorted(gone):
                if self._read_live(self.state[key]) is None:
                    del self.state[key]
            gone = {key for key in gone if key in self.state}
        while gone:
            leaves = sorted(k for k in gone if not any(k in self.state[o].dependencies for o in gone if o != k))
            if not leaves:
                raise ApplyError(f"a dependency cycle among {sorted(gone)}")
            for key in leaves:
                self._delete(self.state.pop(key))
                self.plan.steps.append(Step("delete", *key))
                gone.discard(key)
        while self._replaced:
            self._delete(self._replaced.pop())
        return self.plan

    # --- dispatch -------------------------------------------------------------------------

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        with self._steps:
            if self.failure is not None:
                raise ApplyError(f"{args.typ} {args.name}: not applied, an earlier step failed: {self.failure}")
            self._in_flight += 1
        try:
            return self._step(args)
        except Exception as error:
            with self._steps:
                self.failure = self.failure or str(error).splitlines()[0]
            raise
        finally:
            with self._steps:
                self._in_flight -= 1
                self._steps.notify_all()

    def wait_idle(self, timeout: float = 900) -> None:
        """Returns once no step is in flight: an apply that failed leaves nothing running behind it."""
        with self._steps:
            if not self._steps.wait_for(lambda: self._in_flight == 0, timeout):
                raise ApplyError(f"{self._in_flight} steps still in flight after {timeout:.0f}s")

    def _step(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        if args.typ.startswith("transvidio:"):
            return f"{args.name}-component", dict(args.inputs)
        if args.typ not in self.handlers:
            raise ApplyError(f"{args.typ} ({args.name}): the e2e harness does not implement this resource type")
        key = (args.typ, args.name)
        inputs = plain(args.inputs)
        with self.lock:
            self._declared.add(key)
            meta = self._registering.get(key, {})
            old = self.state.get(key)
        if old is not None and self.refresh:
            old = self._read_live(old)
            if old is None:
                with self.lock:
                    del self.state[key]
        if args.typ == IMAGE:
            inputs["contextHash"] = self._image_context_hash(inputs)
        if old is None:
            self._check_not_taken(args.typ, inputs)
            resource = self._create(args.typ, args.name, inputs, meta)
            self._record("replace" if key in self._replace_dependents else "create", key, ())
        else:
            try:
                changes = provider.diff(args.typ, inputs, old.state)
            except KeyError as error:
                raise ApplyError(str(error)) from None
            replace_keys = set(meta.get("replace_on_changes", ()))
            replacing = sorted(k for k, how in changes.items() if how == provider.REPLACE or k in replace_keys)
            if replacing:
                resource = self._replace(old, inputs, meta, tuple(sorted(changes)))
            elif changes:
                resource = self._update(old, inputs, meta, changes)
                self._record("update", key, tuple(sorted(changes)))
            elif old.init_errors:
                # The engine's empty update: the provider's Update has nothing to change.
                resource = self._new(old.type, old.name, old.id, inputs, old.state, old.outputs, meta)
                self._record("update", key, ())
            else:
                resource = old
                resource.dependencies = meta.get("dependencies", old.dependencies)
                resource.property_dependencies = meta.get("property_dependencies", old.property_dependencies)
                with self.lock:
                    self.plan.unchanged += 1
        with self.lock:
            self.state[key] = resource
        return resource.id, resource.outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
        raise ApplyError(f"the e2e harness does not implement invoke {args.token}")

    def _record(self, op: str, key: Key, attributes: tuple[str, ...]) -> None:
        with self.lock:
            self.plan.steps.append(Step(op, key[0], key[1], attributes))

    def _new(
        self,
        type_: str,
        name: str,
        resource_id: str,
        inputs: dict[str, Any],
        state: dict[str, Any],
        outputs: dict[str, Any],
        meta: dict[str, Any],
    ) -> Resource:
        return Resource(
            type=type_,
            name=name,
            id=resource_id,
            inputs=inputs,
            state=state,
            outputs=outputs,
            dependencies=set(meta.get("dependencies", ())),
            property_dependencies=dict(meta.get("property_dependencies", {})),
            delete_before_replace=bool(meta.get("delete_before_replace")),
            retain_on_delete=bool(meta.get("retain_on_delete")),
        )

    # --- create, update, replace, delete, read: per type --------------------------------

    def _create(self, type_: str, name: str, inputs: dict[str, Any], meta: dict[str, Any]) -> Resource:
        init_errors: tuple[str, ...] = ()
        try:
            resource_id, outputs = self.handlers[type_](name, inputs)
        except InitializationError as failure:
            resource_id, outputs, init_errors = failure.resource_id, failure.outputs, (str(failure),)
        state = provider.planned(type_, inputs, {})
        if type_ == CONTAINER:
            state = provider.read_container(self.client.api.inspect_container(resource_id), state)
        elif type_ == SERVICE:
            state = swarm_target.read_service(self.client.api.inspect_service(resource_id), state)
        resource = self._new(type_, name, resource_id, inputs, state, outputs, meta)
        if init_errors:
            resource.init_errors = init_errors
            with self.lock:
                self.state[(type_, name)] = resource
            raise ApplyError(init_errors[0])
        if name in self.on_created:
            self.on_created[name](resource_id)
        return resource

    def _update(self, old: Resource, inputs: dict[str, Any], meta: dict[str, Any], changes: dict[str, str]) -> Resource:
        resource_id, outputs = old.id, old.outputs
        if old.type == CONTAINER:
            if provider.UPDATE in changes.values():
                self._update_container(old, inputs, changes)
            outputs = {**old.outputs, **inputs}
        elif old.type == IMAGE:  # a changed context is rebuilt: a new image id
            resource_id, outputs = self._image(old.name, inputs)
        elif old.type == SERVICE:
            outputs = {**swarm_target.update_service(self.client, old.id, inputs), "id": old.id}
            state = swarm_target.read_service(
                self.client.api.inspect_service(old.id), provider.planned(old.type, inputs, old.state)
            )
            return self._new(old.type, old.name, resource_id, inputs, state, outputs, meta)
        # U does not read back: the state is the plan.
        state = provider.planned(old.type, inputs, old.state)
        return self._new(old.type, old.name, resource_id, inputs, state, outputs, meta)

    def _replace(
        self, old: Resource, inputs: dict[str, Any], meta: dict[str, Any], attributes: tuple[str, ...]
    ) -> Resource:
        key = (old.type, old.name)
        delete_first = bool(meta.get("delete_before_replace"))
        if delete_first:
            # Pulumi deletes the dependents that would be replaced anyway before the resource.
            for dependent in self._dependents_to_replace(key):
                with self.lock:
                    doomed = self.state.pop(dependent, None)
                    self._replace_dependents.add(dependent)
                if doomed is not None:
                    self._delete(doomed)
            self._delete(old)
            resource = self._create(old.type, old.name, inputs, meta)
        else:
            resource = self._create(old.type, old.name, inputs, meta)
            with self.lock:
                self._replaced.append(old)
        self._record("replace", key, attributes)
        return resource

    def _dependents_to_replace(self, key: Key) -> list[Key]:
        """Resources whose replace-on-change inputs depend on `key`, deepest first."""
        found: list[Key] = []
        frontier = [key]
        while frontier:
            current = frontier.pop()
            for other_key, other in list(self.state.items()):
                if other_key in found or other_key == key:
                    continue
                schema = provider.SCHEMAS.get(other.type, {})
                if any(
                    current in deps and schema.get(prop, provider.Attr(provider.STATE, "")).change == provider.REPLACE
                    for prop, deps in other.property_dependencies.items()
                ):
                    found.append(other_key)
                    frontier.append(other_key)
        return list(reversed(found))

    def _delete(self, resource: Resource) -> None:
        if resource.retain_on_delete:
            return  # Pulumi forgets it; the engine keeps it
        if resource.type == CONTAINER:
            self._delete_container(resource)
        elif resource.type == NETWORK:
            with contextlib.suppress(docker.errors.NotFound):
                self.client.api.remove_network(resource.id)
        elif resource.type == VOLUME:
            with contextlib.suppress(docker.errors.NotFound):
                self.client.api.remove_volume(resource.state["name"])
        elif resource.type == SERVICE:
            swarm_target.remove_service(self.client, resource.id)
        elif resource.type == SECRET:
            with contextlib.suppress(docker.errors.NotFound):
                self.client.api.remove_secret(resource.id)
        elif resource.type == SERVICE_CONFIG:
            with contextlib.suppress(docker.errors.NotFound):
                self.client.api.remove_config(resource.id)
        # Images are kept (keep_locally); generated values have nothing live.

    def _read_live(self, resource: Resource) -> Resource | None:
        """`pulumi refresh` for one resource: None when it is gone."""
        try:
            if resource.type == CONTAINER:
                inspect = self.client.api.inspect_container(resource.id)
                resource.state = provider.read_container(inspect, resource.state)
            elif resource.type == NETWORK:
                self.client.api.inspect_network(resource.id)
            elif resource.type == VOLUME:
                self.client.api.inspect_volume(resource.state["name"])
            elif resource.type == SERVICE:
                resource.state = swarm_target.read_service(self.client.api.inspect_service(resource.id), resource.state)
        except docker.errors.NotFound:
            return None
        return resource

    def _check_not_taken(self, type_: str, inputs: dict[str, Any]) -> None:
        """The provider creates; it never adopts a container or network it does not know."""
        if type_ == CONTAINER:
            try:
                self.client.api.inspect_container(inputs["name"])
            except docker.errors.NotFound:
                return
            raise ApplyError(
                f"container {inputs['name']}: the name is already in use by a container the stack does not manage "
                "(remove it, or import it into the stack)"
            )
        # `names` filters by substring: compare whole names.
        if type_ == NETWORK and any(
            n.name == inputs["name"] for n in self.client.networks.list(names=[inputs["name"]])
        ):
            raise ApplyError(
                f"network {inputs['name']}: a network with that name already exists and the stack does not manage it"
            )

    # --- generated secrets ---------------------------------------------------------------

    def _password(self, name: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        _reject_unknown("RandomPassword", name, inputs, {"length", "special"})
        if inputs.get("special"):
            raise ApplyError(f"RandomPassword {name}: special characters are not implemented")
        alphabet = string.ascii_letters + string.digits
        value = "".join(secrets.choice(alphabet) for _ in range(int(inputs["length"])))
        return name, {**inputs, "result": pulumi.Output.secret(value)}

    def _private_key(self, name: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        _reject_unknown("PrivateKey", name, inputs, {"algorithm"})
        if inputs["algorithm"] != "ED25519":
            raise ApplyError(f"PrivateKey {name}: only ED25519 is implemented")
        key = ed25519.Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ).decode()
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        return name, {
            **inputs,
            "private_key_openssh": pulumi.Output.secret(private),
            "public_key_openssh": public.decode() + "\n",
        }

    # --- networks, volumes, images ---------------------------------------------------------

    def _network(self, name: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        _reject_unknown("Network", name, inputs, {"name", "driver", "internal", "ipamConfigs", "labels"})
        pools = [docker.types.IPAMPool(subnet=c["subnet"]) for c in inputs.get("ipamConfigs", [])]
        network = self.client.networks.create(
            inputs["name"],
            driver=inputs.get("driver", "bridge"),
            internal=bool(inputs.get("internal")),
            ipam=docker.types.IPAMConfig(pool_configs=pools),
            labels={item["label"]: item["value"] for item in inputs.get("labels", [])},
            check_duplicate=True,
        )
        return str(network.id), inputs

    def _volume(self, name: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        _reject_unknown("Volume", name, inputs, {"name", "labels"})
        try:  # Docker's create returns an existing volume of that name (Podman's refuses): adopt it
            volume = self.client.volumes.get(inputs["name"])
        except docker.errors.NotFound:
            volume = self.client.volumes.create(
                name=inputs["name"], labels={item["label"]: item["value"] for item in inputs.get("labels", [])}
            )
        return str(volume.id), {**inputs, "mountpoint": volume.attrs.get("Mountpoint", "")}

    @staticmethod
    def _image_context_hash(inputs: dict[str, Any]) -> str:
        build = inputs.get("build", {})
        context = PROJECT_DIR / build.get("context", ".")
        return _context_hash(context, build.get("dockerfile", ""), build.get("args", {}))

    def _image(self, name: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        _reject_unknown("Image", name, inputs, {"imageName", "build", "skipPush", "buildOnPreview", "contextHash"})
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
            forcerm=True,  # a failed build leaves no intermediate containers either
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
        digest = image_id
        if inputs.get("skipPush") is False:  # pushed, and used by its registry digest
            digest = swarm_target.push(self.client, inputs["imageName"])
        return str(image_id), {**inputs, "repo_digest": digest, "image_name": inputs["imageName"]}

    def _remote_image(self, name: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        _reject_unknown("RemoteImage", name, inputs, {"name", "keepLocally"})
        try:
            image = self.client.images.get(inputs["name"])
        except docker.errors.ImageNotFound:
            raise ApplyError(
                f"RemoteImage {name}: {inputs['name']} is not present and no registry is reachable"
            ) from None
        return str(image.id), {**inputs, "image_id": image.id}

    # --- swarm services, secrets and configs (tests/e2e/swarm_target.py) ----------------------

    def _service(self, name: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        _reject_unknown("Service", name, inputs, swarm_target.SERVICE_INPUTS)
        service_id = swarm_target.create_service(self.client, inputs)
        return service_id, {**inputs, "id": service_id}

    def _secret(self, name: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        _reject_unknown("Secret", name, inputs, provider.SECRET)
        created = self.client.api.create_secret(
            inputs["name"], base64.b64decode(inputs["data"]), labels=_labels(inputs)
        )
        return str(created["ID"]), {**inputs, "data": pulumi.Output.secret(inputs["data"])}

    def _service_config(self, name: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        _reject_unknown("ServiceConfig", name, inputs, provider.SERVICE_CONFIG)
        created = self.client.api.create_config(inputs["name"], inputs["dataRaw"].encode(), labels=_labels(inputs))
        return str(created["ID"]), inputs

    # --- containers --------------------------------------------------------------------------

    def _container(self, name: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        _reject_unknown("Container", name, inputs, provider.CONTAINER)
        api = self.client.api
        networks = inputs.get("networksAdvanced", [])
        health = inputs["healthcheck"]
        _reject_unknown(
            "Container healthcheck", name, health, {"tests", "interval", "timeout", "retries", "startPeriod"}
        )
        ports = inputs.get("ports", [])
        host_ip = _host_ip if self.podman else (lambda ip: ip or "")
        host_config = api.create_host_config(
            network_mode=inputs.get("networkMode", "bridge"),
            restart_policy={"Name": inputs.get("restart", "no")},
            log_config=docker.types.LogConfig(
                type=inputs.get("logDriver", "json-file"), config=inputs.get("logOpts", {})
            ),
            mem_limit=int(inputs["memory"]) * provider.MB if inputs.get("memory") else None,
            memswap_limit=int(inputs["memorySwap"]) * provider.MB if inputs.get("memorySwap") else None,
            shm_size=int(inputs["shmSize"]) * provider.MB if inputs.get("shmSize") else None,
            nano_cpus=provider.parse_cpus(inputs["cpus"]) if inputs.get("cpus") else None,
            security_opt=inputs.get("securityOpts"),
            cap_drop=inputs.get("capabilities", {}).get("drops"),
            cap_add=inputs.get("capabilities", {}).get("adds"),
            mounts=[
                docker.types.Mount(
                    target=m["target"],
                    source=m["source"],
                    type=m.get("type", "volume"),
                    read_only=bool(m.get("readOnly")),
                    no_copy=bool(m.get("volumeOptions", {}).get("noCopy")),
                )
                for m in inputs.get("mounts", [])
            ]
            + [
                docker.types.Mount(
                    target=v["containerPath"], source=v["volumeName"], type="volume", read_only=bool(v.get("readOnly"))
                )
                for v in inputs.get("volumes", [])
            ],
            extra_hosts={h["host"]: h["ip"] for h in inputs.get("hosts", [])} or None,
            port_bindings={
                f"{int(p['internal'])}/{p.get('protocol', 'tcp')}": (host_ip(p.get("ip")), int(p["external"]))
                for p in ports
            },
        )
        try:
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
                    "interval": provider.parse_duration(health.get("interval")),
                    "timeout": provider.parse_duration(health.get("timeout")),
                    "retries": int(health.get("retries", 0)),
                    "start_period": provider.parse_duration(health.get("startPeriod")),
                },
                host_config=host_config,
            )
        except docker.errors.APIError as error:
            raise ApplyError(f"container {inputs['name']}: {error.explanation or error}") from error
        container_id = container["Id"]
        if networks:  # as the provider does: off the default bridge, onto each network
            try:
                api.disconnect_container_from_network(container_id, "bridge")
            except docker.errors.APIError as error:
                if "is not connected" not in str(error):
                    raise
            for net in networks:
                api.connect_container_to_network(
                    container_id, net["name"], aliases=net.get("aliases"), ipv4_address=net.get("ipv4Address")
                )
        for upload in inputs.get("uploads", []):
            self._upload(name, container_id, upload)
        api.start(container_id)
        outputs = {**inputs, "id": container_id}
        if inputs.get("wait"):
            try:
                wait_healthy(self.client, inputs["name"], float(inputs.get("waitTimeout", 60)))
            except ApplyError as error:
                raise InitializationError(str(error), container_id, outputs) from None
        return container_id, outputs

    def _update_container(self, old: Resource, inputs: dict[str, Any], changes: dict[str, str]) -> None:
        """U: one ContainerUpdate with the restart policy and the resources; swap only when set."""
        if changes.get("mustRun") and inputs.get("mustRun", True):
            self.client.api.start(old.id)
        swap = inputs.get("memorySwap")
        try:
            self.client.api.update_container(
                old.id,
                mem_limit=int(inputs.get("memory") or 0) * provider.MB,
                memswap_limit=(int(swap) * provider.MB if int(swap) > 0 else int(swap)) if swap else None,
                restart_policy={"Name": inputs.get("restart", "no")},
            )
        except docker.errors.APIError as error:
            raise ApplyError(f"container {inputs['name']}: unable to update: {error.explanation or error}") from error

    def _delete_container(self, resource: Resource) -> None:
        """The provider's Delete: stop with destroy_grace_seconds (0: kill at once), then remove."""
        api = self.client.api
        grace = int(resource.state.get("destroyGraceSeconds") or 0)

        def stop_and_remove() -> None:
            api.stop(resource.id, timeout=grace)
            api.remove_container(resource.id, force=True)

        remove_container(stop_and_remove)
        if self.podman:
            # Podman tears the old container's port forwarding down asynchronously; a new
            # container publishing the same port must not come up before that is done.
            time.sleep(2)

    def _upload(self, name: str, container_id: str, upload: dict[str, Any]) -> None:
        _reject_unknown("Container upload", name, upload, {"file", "content", "permissions", "owner", "group"})
        data = tar_file(
            upload["file"],
            upload["content"].encode(),
            int(upload.get("permissions", "0644"), 8),
            int(upload.get("owner", 0)),
            int(upload.get("group", 0)),
        )
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


def _labels(inputs: dict[str, Any]) -> dict[str, str]:
    return {item["label"]: item["value"] for item in inputs.get("labels", [])}


def up(
    mocks: DockerApplyMocks,
    stack: str,
    overrides: dict[str, Any] | None = None,
    refresh: bool = False,
    secret_config: dict[str, str] | None = None,
) -> tuple[Evaluation, Plan]:
    """`pulumi up` (with `--refresh` when asked): evaluate, apply, delete what is gone; prints the plan."""
    mocks.stack = stack
    mocks.begin(refresh=refresh)
    try:
        evaluation = evaluate(stack, overrides, mocks=mocks, secret_config=secret_config)
    finally:
        mocks.wait_idle()
    plan = mocks.finish()
    print(plan)
    return evaluation, plan


def teardown(client: docker.DockerClient, stack: str, volumes: bool = True) -> None:
    """Removes everything labelled with the stack, so an apply after a killed run starts clean."""
    label = f"{LABEL_PREFIX}.stack={stack}"
    for container in client.containers.list(all=True, filters={"label": label}):
        remove_container(functools.partial(container.remove, force=True, v=False))
    for network in client.networks.list(filters={"label": label}):
        network.remove()
    if volumes:
        for volume in client.volumes.list(filters={"label": label}):
            volume.remove(force=True)
