"""The provider's docker_service, for the apply harness: a service's inputs as the Docker API's
ServiceSpec, its create and update waiting as converge_config makes the provider wait, and what
its Read puts back into the state (tests/e2e/provider.py has the rows, with their sources).

SVF = resource_docker_service_funcs.go, SVS = resource_docker_service_structures.go (v4.5.0).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import docker
import docker.errors

from tests.e2e import provider

SERVICE_INPUTS = frozenset(provider.SERVICE) - {"mode.kind", "mode.replicas"} | {"mode"}
RUNNING = "running"


class ServiceError(RuntimeError):
    """A service did not converge, or its update rolled back: what `pulumi up` reports."""


def _ns(value: str | None) -> int:
    return provider.parse_duration(value)


def _labels(items: list[dict[str, Any]] | None) -> dict[str, str]:
    return {item["label"]: item["value"] for item in items or []}


def _file(ref: dict[str, Any]) -> dict[str, Any]:
    return {
        "Name": ref["fileName"],
        "UID": str(ref.get("fileUid", "0")),
        "GID": str(ref.get("fileGid", "0")),
        "Mode": int(ref.get("fileMode", 0o444)),
    }


def _mount(mount: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "Target": mount["target"],
        "Type": mount.get("type", "volume"),
        "ReadOnly": bool(mount.get("readOnly")),
    }
    if mount.get("source"):
        spec["Source"] = mount["source"]
    if "volumeOptions" in mount:
        options = mount["volumeOptions"]
        spec["VolumeOptions"] = {"NoCopy": bool(options.get("noCopy")), "Labels": _labels(options.get("labels"))}
    if "tmpfsOptions" in mount:
        spec["TmpfsOptions"] = {"SizeBytes": int(mount["tmpfsOptions"]["sizeBytes"])}
    return spec


def _update_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    if not config:
        return None
    return {
        "Parallelism": int(config.get("parallelism", 1)),
        "Delay": _ns(config.get("delay")),
        "FailureAction": config.get("failureAction", "pause"),
        "Monitor": _ns(config.get("monitor")),
        "Order": config.get("order", "stop-first"),
    }


def service_spec(inputs: dict[str, Any]) -> dict[str, Any]:
    """SVS createServiceSpec: the program's inputs as the ServiceSpec Docker is sent."""
    task = inputs["taskSpec"]
    container = task["containerSpec"]
    health = container.get("healthcheck") or {}
    container_spec: dict[str, Any] = {
        "Image": container["image"],
        "Labels": _labels(container.get("labels")),
        "Env": [f"{k}={v}" for k, v in sorted((container.get("env") or {}).items())],
        "Mounts": [_mount(m) for m in container.get("mounts", [])],
        "Secrets": [
            {"File": _file(ref), "SecretID": ref["secretId"], "SecretName": ref["secretName"]}
            for ref in container.get("secrets", [])
        ],
        "Configs": [
            {"File": _file(ref), "ConfigID": ref["configId"], "ConfigName": ref["configName"]}
            for ref in container.get("configs", [])
        ],
        "CapabilityDrop": container.get("capDrops"),
        "CapabilityAdd": container.get("capAdds"),
        "StopGracePeriod": _ns(container.get("stopGracePeriod")),
    }
    for key, name in (("hostname", "Hostname"), ("commands", "Command"), ("args", "Args"), ("user", "User")):
        if container.get(key):
            container_spec[name] = container[key]
    if health:
        container_spec["Healthcheck"] = {
            "Test": health["tests"],
            "Interval": _ns(health.get("interval")),
            "Timeout": _ns(health.get("timeout")),
            "Retries": int(health.get("retries", 0)),
            "StartPeriod": _ns(health.get("startPeriod")),
        }
    placement = task.get("placement") or {}
    limits = (task.get("resources") or {}).get("limits") or {}
    restart = task.get("restartPolicy") or {}
    log_driver = task.get("logDriver")
    template: dict[str, Any] = {
        "ContainerSpec": {k: v for k, v in container_spec.items() if v not in (None, [])},
        "Networks": [{"Target": n["id"], "Aliases": n.get("aliases") or []} for n in task.get("networksAdvanceds", [])],
        "Placement": {
            "Constraints": placement.get("constraints") or [],
            "MaxReplicas": int(placement.get("maxReplicas") or 0),
            "Preferences": [
                {"Spread": {"SpreadDescriptor": pref.split("=", 1)[1]}} for pref in placement.get("prefs") or []
            ],
        },
        "Resources": {
            "Limits": {"MemoryBytes": int(limits.get("memoryBytes", 0)), "NanoCPUs": int(limits.get("nanoCpus", 0))}
        },
        "RestartPolicy": {"Condition": restart.get("condition", "any"), "Delay": _ns(restart.get("delay"))},
    }
    if log_driver:
        template["LogDriver"] = {"Name": log_driver["name"], "Options": log_driver.get("options") or {}}
    mode = inputs.get("mode") or {}
    endpoint = inputs.get("endpointSpec") or {}
    spec: dict[str, Any] = {
        "Name": inputs["name"],
        "Labels": _labels(inputs.get("labels")),
        "TaskTemplate": template,
        "Mode": {"Global": {}}
        if mode.get("global")
        else {"Replicated": {"Replicas": int((mode.get("replicated") or {}).get("replicas", 1))}},
        "EndpointSpec": {
            "Mode": endpoint.get("mode", "vip"),
            "Ports": [
                {
                    "TargetPort": int(port["targetPort"]),
                    "PublishedPort": int(port["publishedPort"]),
                    "Protocol": port.get("protocol", "tcp"),
                    "PublishMode": port.get("publishMode", "ingress"),
                }
                for port in endpoint.get("ports", [])
            ],
        },
    }
    for key, name in (("updateConfig", "UpdateConfig"), ("rollbackConfig", "RollbackConfig")):
        config = _update_config(inputs.get(key))
        if config:
            spec[name] = config
    return spec


def _post(client: docker.DockerClient, path: str, body: dict[str, Any], **params: Any) -> Any:
    api = client.api
    response = api._post_json(api._url(path), data=body, params=params or None)
    return api._result(response, json=True)


def tasks(client: docker.DockerClient, service_id: str) -> list[dict[str, Any]]:
    return list(client.api.tasks(filters={"service": service_id, "desired-state": "running"}))


def _task_failures(client: docker.DockerClient, service_id: str) -> str:
    recent = sorted(client.api.tasks(filters={"service": service_id}), key=lambda t: t.get("UpdatedAt", ""))[-3:]
    return "; ".join(f"{t['Status']['State']}: {t['Status'].get('Err') or t['Status'].get('Message')}" for t in recent)


def _converged(client: docker.DockerClient, service_id: str) -> bool:
    """SVF replicatedConsoleLogUpdater: every wanted task running (a task with a healthcheck is
    `running` once it is healthy)."""
    inspect = client.api.inspect_service(service_id)
    wanted = int(inspect["Spec"]["Mode"].get("Replicated", {}).get("Replicas", 1))
    running = [t for t in tasks(client, service_id) if t["Status"]["State"] == RUNNING]
    return len(running) == wanted


def _timeout(inputs: dict[str, Any]) -> float | None:
    converge = inputs.get("convergeConfig")
    return _ns(converge["timeout"]) / 1e9 if converge and converge.get("timeout") else None


def create_service(client: docker.DockerClient, inputs: dict[str, Any]) -> str:
    """SVF resourceDockerServiceCreate: create, then with converge_config wait until converged;
    a service that does not converge is deleted and the create fails."""
    try:
        created = _post(client, "/services/create", service_spec(inputs))
    except docker.errors.APIError as error:
        raise ServiceError(f"service {inputs['name']}: {error.explanation or error}") from error
    service_id = str(created["ID"])
    timeout = _timeout(inputs)
    if timeout is None:
        return service_id
    deadline = time.monotonic() + timeout
    while not _converged(client, service_id):
        if time.monotonic() > deadline:
            failures = _task_failures(client, service_id)
            remove_service(client, service_id)
            raise ServiceError(f"service {inputs['name']} did not converge in {timeout:.0f}s: {failures}")
        time.sleep(1)
    return service_id


def update_service(client: docker.DockerClient, service_id: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """SVF resourceDockerServiceUpdate: one ServiceUpdate with the whole new spec, then with
    converge_config wait for the update to complete; a rollback is an error."""
    before = client.api.inspect_service(service_id)
    previous = (before.get("UpdateStatus") or {}).get("StartedAt")
    try:
        _post(client, f"/services/{service_id}/update", service_spec(inputs), version=before["Version"]["Index"])
    except docker.errors.APIError as error:
        raise ServiceError(f"service {inputs['name']}: {error.explanation or error}") from error
    timeout = _timeout(inputs)
    if timeout is None:
        return inputs
    deadline = time.monotonic() + timeout
    # Until the orchestrator starts this update, the service shows the last update's status,
    # or none at all (the update request clears it): either read as this update's would pass
    # an update that is about to roll back. A change to the task template always starts one
    # (however long a busy manager takes to): wait for it. (The provider waits 7 s before its
    # first look instead.) A change that touches no task (a label, the replica count) starts none.
    after = client.api.inspect_service(service_id)
    rolls = after["Spec"]["TaskTemplate"] != before["Spec"]["TaskTemplate"]
    while rolls and (client.api.inspect_service(service_id).get("UpdateStatus") or {}).get("StartedAt") in (
        previous,
        None,
    ):
        if time.monotonic() > deadline:
            raise ServiceError(f"service {inputs['name']}: its update did not begin in {timeout:.0f}s")
        time.sleep(0.2)
    while True:
        status = (client.api.inspect_service(service_id).get("UpdateStatus") or {}).get("State")
        if status in ("rollback_completed", "rollback_paused", "paused"):
            message = client.api.inspect_service(service_id)["UpdateStatus"].get("Message", "")
            raise ServiceError(f"service {inputs['name']}: update {status.replace('_', ' ')}: {message}")
        if status in ("completed", None) and _converged(client, service_id):
            return inputs
        if time.monotonic() > deadline:
            raise ServiceError(f"service {inputs['name']} did not converge in {timeout:.0f}s (update {status})")
        time.sleep(1)


def remove_service(client: docker.DockerClient, service_id: str) -> None:
    """SVF deleteService: remove, then wait until its containers are gone (a secret or a network
    it used can only go after them)."""
    with contextlib.suppress(docker.errors.NotFound):
        client.api.remove_service(service_id)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if not client.api.tasks(filters={"service": service_id}):
                return
        except docker.errors.NotFound:
            return
        time.sleep(0.5)


def read_service(inspect: dict[str, Any], applied: dict[str, Any]) -> dict[str, Any]:
    """What R (flattenTaskSpec and friends) reads back where it differs from what was sent: the
    networks by id, as Docker stores their targets; the mode; the name and labels."""
    state = dict(applied)
    spec = inspect["Spec"]
    state["name"] = spec["Name"]
    state["labels"] = [{"label": k, "value": v} for k, v in sorted((spec.get("Labels") or {}).items())]
    mode = spec.get("Mode") or {}
    state["mode.kind"] = "global" if "Global" in mode else "replicated"
    state["mode.replicas"] = None if "Global" in mode else int(mode["Replicated"]["Replicas"])
    networks = spec["TaskTemplate"].get("Networks") or []
    state["taskSpec.networksAdvanceds"] = [
        {"id": n["Target"], **({"aliases": n["Aliases"]} if n.get("Aliases") else {})} for n in networks
    ] or None
    return state


def push(client: docker.DockerClient, image_name: str) -> str:
    """Pushes `image_name` and returns it by digest (repository@sha256:...), as the Image
    resource's repo_digest after a push."""
    repository = image_name.rsplit(":", 1)[0]
    digest = None
    for line in client.api.push(image_name, stream=True, decode=True):
        if "error" in line:
            raise ServiceError(f"push of {image_name} failed: {line['error']}")
        aux = line.get("aux") or {}
        digest = aux.get("Digest", digest)
    if not digest:
        raise ServiceError(f"push of {image_name} reported no digest")
    return f"{repository}@{digest}"


def teardown(client: docker.DockerClient, label: str) -> None:
    """Removes a stack's services, then what they used: its secrets, configs and networks."""
    for service in client.api.services(filters={"label": label}):
        remove_service(client, service["ID"])
    for secret in client.api.secrets(filters={"label": label}):
        with contextlib.suppress(docker.errors.NotFound):
            client.api.remove_secret(secret["ID"])
    for config in client.api.configs(filters={"label": label}):
        with contextlib.suppress(docker.errors.NotFound):
            client.api.remove_config(config["ID"])
    # A removed service's tasks leave its networks a moment later ("network ... is in use").
    for network in client.api.networks(filters={"label": label}):
        deadline = time.monotonic() + 60
        while True:
            try:
                client.api.remove_network(network["Id"])
                break
            except docker.errors.NotFound:
                break
            except docker.errors.APIError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
