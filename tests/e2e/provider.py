"""What the pulumi-docker provider does with each attribute the program uses.

pulumi-docker 5.x bridges kreuzwerker/terraform-provider-docker v4.5.0. For every
attribute of every resource type the program registers, one row says how a change is
applied (`REPLACE`: ForceNew in the schema; `UPDATE`: the provider's Update calls the
Docker API; `NOOP_UPDATE`: shown as an update, but Update does nothing with it;
`STATE`: kept in the state only) and how it is read back into the state the next
`pulumi up` diffs against. Sources are cited per row:
  S = internal/provider/resource_docker_container.go (the schema)
  R = resource_docker_container_funcs.go, resourceDockerContainerRead
  U = resource_docker_container_funcs.go, resourceDockerContainerUpdate
  N = resource_docker_network.go, V = resource_docker_volume.go (every attribute ForceNew)
  SV = resource_docker_service.go (the schema), SVF = resource_docker_service_funcs.go
  SE = resource_docker_secret.go, SC = resource_docker_config.go
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

REPLACE = "replace"
UPDATE = "update"
NOOP_UPDATE = "noop-update"
STATE = "state"

MB = 1024 * 1024


@dataclass(frozen=True)
class Attr:
    change: str
    source: str
    computed: bool = False  # Optional+Computed: an unset input keeps what the state holds
    default: Any = None  # the schema's Default when the input is unset
    unordered: bool = False  # TypeSet: order does not matter
    # How the provider's Read turns `docker inspect` into the state's value; None: never
    # read, the state keeps what was applied.
    read: Callable[[dict[str, Any], dict[str, Any]], Any] | None = None


def go_duration(nanoseconds: int) -> str:
    """Go's time.Duration.String() for the whole-millisecond durations Docker stores."""
    if nanoseconds == 0:
        return "0s"
    total_ms, rest = divmod(nanoseconds, 1_000_000)
    if rest or total_ms < 1000:
        if total_ms < 1000 and not rest:
            return f"{total_ms}ms"
        raise ValueError(f"duration {nanoseconds}ns is not modelled")
    hours, rem_ms = divmod(total_ms, 3_600_000)
    minutes, rem_ms = divmod(rem_ms, 60_000)
    seconds, millis = divmod(rem_ms, 1000)
    text = f"{seconds}.{millis:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


def parse_duration(value: str | None) -> int:
    """Nanoseconds of a Go duration string (what the provider passes to Docker)."""
    if not value:
        return 0
    units = {"h": 3_600_000_000_000, "m": 60_000_000_000, "s": 1_000_000_000, "ms": 1_000_000}
    total, number = 0.0, ""
    index = 0
    while index < len(value):
        char = value[index]
        if char.isdigit() or char == ".":
            number += char
            index += 1
            continue
        unit = "ms" if value.startswith("ms", index) else char
        if unit not in units or not number:
            raise ValueError(f"unparsable duration {value!r}")
        total += float(number) * units[unit]
        number = ""
        index += len(unit)
    if number:
        raise ValueError(f"unparsable duration {value!r} (a number without a unit)")
    return int(total)


def _healthcheck(inspect: dict[str, Any], _: dict[str, Any]) -> Any:
    health = inspect["Config"].get("Healthcheck")
    if not health:
        return None
    return {
        "tests": health.get("Test") or [],
        "interval": go_duration(int(health.get("Interval") or 0)),
        "timeout": go_duration(int(health.get("Timeout") or 0)),
        "startPeriod": go_duration(int(health.get("StartPeriod") or 0)),
        "startInterval": go_duration(int(health.get("StartInterval") or 0)),
        "retries": int(health.get("Retries") or 0),
    }


def go_nano_decimal(nanoseconds: int) -> str:
    """helpers.go nanoInt64ToDecimalString: big.Rat.FloatString(9), then "1.0" when that
    string holds exactly nine zeros, else its trailing zeros trimmed."""
    if nanoseconds == 0:
        return "0"
    whole, fraction = divmod(nanoseconds, 1_000_000_000)
    nine = f"{whole}.{fraction:09d}"
    if nine.count("0") == 9:
        tenths = (nanoseconds + 50_000_000) // 100_000_000  # FloatString(1): a half away from zero
        return f"{tenths // 10}.{tenths % 10}"
    return nine.rstrip("0")


def parse_cpus(value: str) -> int:
    """NanoCPUs from a decimal CPU count, as docker/cli's opts.ParseCPUs reads it."""
    whole, _, fraction = value.partition(".")
    return int(whole or 0) * 1_000_000_000 + int((fraction + "0" * 9)[:9] or 0)


def _cpus(inspect: dict[str, Any], applied: dict[str, Any]) -> Any:
    nanos = int(inspect["HostConfig"].get("NanoCpus") or 0)
    return go_nano_decimal(nanos) if nanos > 0 else applied.get("cpus")  # R: set only when > 0


def _mb(value: int | None) -> int:
    value = int(value or 0)
    return value // MB if value > 0 else value


def _ports(inspect: dict[str, Any], applied: dict[str, Any]) -> Any:
    if not applied.get("ports"):
        return None  # R: only read when the input has ports
    out = []
    for key in sorted(inspect["NetworkSettings"].get("Ports") or {}):
        internal, protocol = key.split("/")
        for binding in inspect["NetworkSettings"]["Ports"][key] or []:
            out.append(
                {
                    "internal": int(internal),
                    "external": int(binding["HostPort"]),
                    "ip": binding["HostIp"],
                    "protocol": protocol,
                }
            )
    return out


def _capabilities(inspect: dict[str, Any], _: dict[str, Any]) -> Any:
    host = inspect["HostConfig"]
    if not (host.get("CapAdd") or host.get("CapDrop")):
        return None
    return {"adds": host.get("CapAdd") or [], "drops": host.get("CapDrop") or []}


def _hosts(inspect: dict[str, Any], _: dict[str, Any]) -> Any:
    # R: flattenExtraHosts splits "name:ip" on ":".
    return [
        {"host": entry.split(":")[0], "ip": entry.split(":")[1]}
        for entry in inspect["HostConfig"].get("ExtraHosts") or []
    ]


def _image(inspect: dict[str, Any], applied: dict[str, Any]) -> Any:
    # R: an image given as "sha256:..." is read back as the container's image id.
    return inspect["Image"] if str(applied.get("image", "")).startswith("sha256:") else inspect["Config"]["Image"]


CONTAINER: dict[str, Attr] = {
    "name": Attr(REPLACE, "S name ForceNew; R Name", read=lambda i, _: i["Name"].lstrip("/")),
    "hostname": Attr(
        REPLACE, "S ForceNew+Computed; R Config.Hostname", computed=True, read=lambda i, _: i["Config"]["Hostname"]
    ),
    "image": Attr(REPLACE, "S ForceNew; R Image or Config.Image", read=_image),
    "envs": Attr(REPLACE, "S env ForceNew set; not read", unordered=True),
    "command": Attr(
        REPLACE, "S ForceNew+Computed; R Config.Cmd", computed=True, read=lambda i, _: i["Config"].get("Cmd")
    ),
    "entrypoints": Attr(
        REPLACE,
        "S entrypoint ForceNew+Computed; R Config.Entrypoint",
        computed=True,
        read=lambda i, _: i["Config"].get("Entrypoint"),
    ),
    # S: DiffSuppressFunc treats an empty input as no change.
    "user": Attr(
        REPLACE, "S ForceNew, empty suppressed; R Config.User", computed=True, read=lambda i, _: i["Config"].get("User")
    ),
    "networksAdvanced": Attr(REPLACE, "S ForceNew set; R only when empty (import)", unordered=True),
    # Create sets it (Default "bridge"), then leaves "bridge" for networks_advanced: the
    # container keeps HostConfig.NetworkMode "bridge", which is what R reads back.
    "networkMode": Attr(
        REPLACE,
        "S ForceNew, Default bridge; R HostConfig.NetworkMode",
        default="bridge",
        read=lambda i, _: i["HostConfig"]["NetworkMode"],
    ),
    "ports": Attr(REPLACE, "S ForceNew; R flattenContainerPorts", read=_ports),
    "volumes": Attr(REPLACE, "S ForceNew set; not read", unordered=True),
    "mounts": Attr(REPLACE, "S ForceNew set; not modelled as read", unordered=True),
    "uploads": Attr(REPLACE, "S upload ForceNew set; not read", unordered=True),
    "hosts": Attr(REPLACE, "S host ForceNew set; R flattenExtraHosts", unordered=True, read=_hosts),
    # S: not ForceNew, and not among U's attributes: an update that changes nothing.
    "healthcheck": Attr(NOOP_UPDATE, "S Optional+Computed; R Duration.String()", computed=True, read=_healthcheck),
    "restart": Attr(
        UPDATE,
        "S Default no; U; R RestartPolicy.Name",
        default="no",
        read=lambda i, _: i["HostConfig"]["RestartPolicy"]["Name"],
    ),
    "logDriver": Attr(
        REPLACE,
        "S ForceNew+Computed; R LogConfig.Type",
        computed=True,
        read=lambda i, _: i["HostConfig"]["LogConfig"]["Type"],
    ),
    "logOpts": Attr(
        REPLACE,
        "S ForceNew; R LogConfig.Config when set",
        read=lambda i, a: (i["HostConfig"]["LogConfig"].get("Config") or {}) if a.get("logOpts") else None,
    ),
    "memory": Attr(
        UPDATE, "S Optional; U ContainerUpdate; R Memory/MB", read=lambda i, _: _mb(i["HostConfig"].get("Memory"))
    ),
    "memorySwap": Attr(
        UPDATE, "S Optional; U only when set; R MemorySwap/MB", read=lambda i, _: _mb(i["HostConfig"].get("MemorySwap"))
    ),
    "cpus": Attr(REPLACE, "S cpus ForceNew; R nanoInt64ToDecimalString(NanoCPUs) when > 0", read=_cpus),
    "shmSize": Attr(
        REPLACE,
        "S ForceNew+Computed; R ShmSize/MB",
        computed=True,
        read=lambda i, _: _mb(i["HostConfig"].get("ShmSize")),
    ),
    "securityOpts": Attr(
        REPLACE,
        "S ForceNew+Computed set; R SecurityOpt",
        computed=True,
        unordered=True,
        read=lambda i, _: i["HostConfig"].get("SecurityOpt"),
    ),
    "capabilities": Attr(
        REPLACE, "S ForceNew, no DiffSuppressFunc; R CapAdd/CapDrop as Docker stores them", read=_capabilities
    ),
    "labels": Attr(REPLACE, "S ForceNew+Computed set; not read", computed=True, unordered=True),
    "wait": Attr(STATE, "S Default false; not read", default=False),
    "waitTimeout": Attr(STATE, "S Default 60; not read", default=60),
    "destroyGraceSeconds": Attr(STATE, "S Optional; used by Delete; not read"),
    "mustRun": Attr(UPDATE, "S Default true; U starts a stopped container", default=True),
}

NETWORK: dict[str, Attr] = {
    key: Attr(REPLACE, "N every attribute ForceNew", unordered=key in ("labels", "ipamConfigs"))
    for key in ("name", "driver", "internal", "ipamConfigs", "labels", "options", "attachable", "ipv6")
}
VOLUME: dict[str, Attr] = {
    key: Attr(REPLACE, "V every attribute ForceNew", unordered=key == "labels")
    for key in ("name", "driver", "driverOpts", "labels")
}
# pulumi-docker's own (not bridged) Image: a changed build context or input rebuilds it.
IMAGE: dict[str, Attr] = {
    key: Attr(UPDATE, "pulumi-docker provider/image.go: diff on inputs and the context's hash")
    for key in ("imageName", "build", "skipPush", "buildOnPreview", "contextHash")
}
# docker_image (RemoteImage): resource_docker_image.go, name ForceNew, keep_locally only used by Delete.
REMOTE_IMAGE: dict[str, Attr] = {
    "name": Attr(REPLACE, "resource_docker_image.go: name ForceNew"),
    "keepLocally": Attr(STATE, "resource_docker_image.go: keep_locally, read by Delete only"),
}
# pulumi-random / pulumi-tls: every input ForceNew (a new value).
GENERATED: dict[str, Attr] = {
    key: Attr(REPLACE, "random/tls: every input ForceNew")
    for key in ("length", "special", "overrideSpecial", "algorithm")
}

# docker_service: updated in place by a ServiceUpdate (a rolling update driven by update_config),
# except what SV marks ForceNew. Nested ForceNew attributes are rows of their own, by path:
# `service_attributes` splits a service's inputs that way before they are diffed.
SERVICE: dict[str, Attr] = {
    "name": Attr(REPLACE, "SV name ForceNew; R Spec.Name"),
    "labels": Attr(UPDATE, "SV labels set; R mapToLabelSet(Spec.Labels)", unordered=True),
    # SV: mode is a ForceNew block of one: switching replicated <-> global replaces; the replicas
    # count nested in it has no ForceNew of its own (SDKv2 diffList: ForceNew on the count only).
    "mode.kind": Attr(REPLACE, "SV mode ForceNew (the block: replicated or global)"),
    "mode.replicas": Attr(UPDATE, "SV mode.replicated.replicas, not ForceNew; SVF update scales"),
    "taskSpec": Attr(UPDATE, "SV task_spec; SVF ServiceUpdate; R flattenTaskSpec"),
    "taskSpec.networksAdvanceds": Attr(
        REPLACE, "SV task_spec.networks_advanced id/aliases/driver_opts ForceNew; R id from Target", unordered=True
    ),
    "taskSpec.containerSpec.hosts": Attr(REPLACE, "SV container_spec.hosts ForceNew"),
    "taskSpec.containerSpec.sysctl": Attr(REPLACE, "SV container_spec.sysctl ForceNew"),
    "updateConfig": Attr(UPDATE, "SV update_config; R flattenServiceUpdateOrRollbackConfig"),
    "rollbackConfig": Attr(UPDATE, "SV rollback_config; R flattenServiceUpdateOrRollbackConfig"),
    "endpointSpec": Attr(UPDATE, "SV endpoint_spec; R flattenServiceEndpoint"),
    "convergeConfig": Attr(STATE, "SV converge_config: how Create/Update wait, not sent to Docker"),
    "auth": Attr(REPLACE, "SV auth ForceNew"),
}
# Swarm secrets and configs are immutable in Docker, and every attribute is ForceNew.
SECRET: dict[str, Attr] = {
    "name": Attr(REPLACE, "SE name ForceNew; R Spec.Name"),
    "data": Attr(REPLACE, "SE data ForceNew, Sensitive; not read (Docker never returns it)"),
    "labels": Attr(REPLACE, "SE labels ForceNew", unordered=True),
}
SERVICE_CONFIG: dict[str, Attr] = {
    "name": Attr(REPLACE, "SC name ForceNew; R Spec.Name"),
    "data": Attr(REPLACE, "SC data ForceNew; R base64 of Spec.Data"),
    "dataRaw": Attr(REPLACE, "SC data_raw ForceNew; R Spec.Data as text"),
    "labels": Attr(REPLACE, "SC labels ForceNew", unordered=True),
}
SPLIT_SERVICE_PATHS = ("taskSpec.networksAdvanceds", "taskSpec.containerSpec.hosts", "taskSpec.containerSpec.sysctl")


def service_attributes(inputs: dict[str, Any]) -> dict[str, Any]:
    """A service's inputs keyed as SERVICE's rows: the ForceNew paths taken out of taskSpec,
    the mode split into its kind and its replicas."""
    flat = {key: value for key, value in inputs.items() if key != "mode"}
    mode = inputs.get("mode") or {"replicated": {"replicas": 1}}
    flat["mode.kind"] = "global" if mode.get("global") else "replicated"
    flat["mode.replicas"] = None if mode.get("global") else int(mode.get("replicated", {}).get("replicas", 1))
    task = json.loads(json.dumps(inputs.get("taskSpec") or {}))
    for path in SPLIT_SERVICE_PATHS:
        parent = task
        *parents, leaf = path.split(".")[1:]
        for part in parents:
            parent = parent.get(part) or {}
        if leaf in parent:
            flat[path] = parent.pop(leaf)
    flat["taskSpec"] = task
    return flat


SCHEMAS: dict[str, dict[str, Attr]] = {
    "docker:index/service:Service": SERVICE,
    "docker:index/secret:Secret": SECRET,
    "docker:index/serviceConfig:ServiceConfig": SERVICE_CONFIG,
    "docker:index/container:Container": CONTAINER,
    "docker:index/network:Network": NETWORK,
    "docker:index/volume:Volume": VOLUME,
    "docker:index/image:Image": IMAGE,
    "docker:index/remoteImage:RemoteImage": REMOTE_IMAGE,
    "random:index/randomPassword:RandomPassword": GENERATED,
    "tls:index/privateKey:PrivateKey": GENERATED,
}


def _empty(value: Any) -> bool:
    # Terraform holds an unset primitive as its zero value and an unset collection as empty.
    return value is None or value == [] or value == {} or value == "" or value == 0 or value is False


# Nested attributes that are TypeSets in S (networks_advanced.aliases, capabilities.add and
# .drop); every other nested list (healthcheck.test, ...) is a TypeList: its order counts.
UNORDERED_NESTED = frozenset({"aliases", "adds", "drops"})


def _canonical(value: Any, unordered: bool) -> Any:
    """The value as Terraform compares it: empty is unset, sets in a stable order."""
    if _empty(value):
        return None
    if isinstance(value, dict):
        return {k: _canonical(v, k in UNORDERED_NESTED) for k, v in sorted(value.items()) if not _empty(v)}
    if isinstance(value, list):
        items = [_canonical(v, False) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True)) if unordered else items
    return value


def planned(type_: str, inputs: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """The state the provider plans from the program's inputs: defaults filled, and an unset
    Computed attribute keeping what the state holds."""
    schema = SCHEMAS[type_]
    if schema is SERVICE and "taskSpec" in inputs and not isinstance(inputs.get("mode.kind"), str):
        inputs = service_attributes(inputs)
    plan = {}
    for key, attr in schema.items():
        if key in inputs and not _empty(inputs[key]):
            value = inputs[key]
            if key == "healthcheck":  # S: the nested durations and retries have defaults
                value = {
                    "interval": "0s",
                    "timeout": "0s",
                    "startPeriod": "0s",
                    "startInterval": "0s",
                    "retries": 0,
                    **value,
                }
            plan[key] = value
        elif attr.computed and key in state:
            plan[key] = state[key]
        elif attr.default is not None:
            plan[key] = attr.default
    return plan


def diff(type_: str, inputs: dict[str, Any], state: dict[str, Any]) -> dict[str, str]:
    """Attribute -> how its change is applied, for every attribute whose planned value differs."""
    schema = SCHEMAS[type_]
    if schema is SERVICE:
        inputs = service_attributes(inputs)
    unknown = sorted(set(inputs) - set(schema))
    if unknown:
        raise KeyError(f"{type_}: the provider model has no row for input(s) {unknown}")
    plan = planned(type_, inputs, state)
    return {
        key: attr.change
        for key, attr in schema.items()
        if _canonical(plan.get(key), attr.unordered) != _canonical(state.get(key), attr.unordered)
    }


def read_container(inspect: dict[str, Any], applied: dict[str, Any]) -> dict[str, Any]:
    """The state the provider's Read stores for a container: read-back values where R reads
    them, the applied inputs where it does not."""
    state = {key: value for key, value in applied.items()}
    for key, attr in CONTAINER.items():
        if attr.read is not None:
            state[key] = attr.read(inspect, applied)
    return state
