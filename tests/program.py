"""Runs the real program (__main__.py) under Pulumi mocks and records what it registers.

The unit tests use `FakeMocks` (no Docker, no network); the end-to-end harness passes
mocks whose `new_resource` creates the real thing. Config is read from the real
Pulumi.yaml and Pulumi.<stack>.yaml, plus explicit overrides.
"""

from __future__ import annotations

import copy
import hashlib
import json
import pathlib
import runpy
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import rpc
from pulumi.runtime import settings as runtime_settings

from components.render import read_stack_file
from components.settings import PROJECT

PROJECT_DIR = pathlib.Path(__file__).resolve().parent.parent


def stack_config(stack: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pulumi.yaml defaults + Pulumi.<stack>.yaml, then `overrides` merged per object key."""
    raw = copy.deepcopy(read_stack_file(PROJECT_DIR, stack))
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


@dataclass
class Registration:
    type: str
    name: str
    urn: str
    inputs: dict[str, Any]  # secrets still wrapped: see `is_secret` / `plain`
    outputs: dict[str, Any]
    options: dict[str, Any]  # resource options the engine would see


def is_secret(value: Any) -> bool:
    return bool(rpc.is_rpc_secret(value))


def plain(value: Any) -> Any:
    """The value with every secret wrapper removed, recursively."""
    if rpc.is_rpc_secret(value):
        return plain(rpc.unwrap_rpc_secret(value))
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


class FakeMocks(pulumi.runtime.Mocks):
    """Engine-like fakes: secret passwords and keys, deterministic ids and digests."""

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        digest = hashlib.sha256(f"{args.typ}:{args.name}".encode()).hexdigest()
        outputs = dict(args.inputs)
        if args.typ == "random:index/randomPassword:RandomPassword":
            # The engine marks `result` secret (additional_secret_outputs); so do we.
            outputs["result"] = pulumi.Output.secret(f"pw{digest[:30]}")
        elif args.typ == "tls:index/privateKey:PrivateKey":
            outputs["private_key_openssh"] = pulumi.Output.secret(f"-----BEGIN OPENSSH PRIVATE KEY-----{digest}")
            outputs["public_key_openssh"] = f"ssh-ed25519 AAAAC3{digest[:40]} \n"
        elif args.typ == "docker:index/image:Image":
            outputs["repo_digest"] = f"sha256:{digest}"
        elif args.typ == "docker:index/remoteImage:RemoteImage":
            outputs["image_id"] = f"sha256:{digest}"
        return f"{args.name}-id", outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
        return {}, None


class RecordingMonitor(pulumi_mocks.MockMonitor):
    """A MockMonitor that also keeps each registration's inputs with secrets wrapped."""

    def __init__(self, mocks: pulumi.runtime.Mocks) -> None:
        super().__init__(mocks)
        self.registrations: list[Registration] = []

    def RegisterResource(self, request: Any) -> Any:  # noqa: N802 - gRPC method name
        options = {
            "delete_before_replace": request.deleteBeforeReplace,
            "replace_on_changes": list(request.replaceOnChanges),
            "retain_on_delete": request.retainOnDelete,
            "protect": request.protect,
        }
        # Mocks that model the engine (the e2e harness) need what new_resource is not told.
        registering = getattr(self.mocks, "registering", None)
        if registering is not None:
            registering(
                request.type,
                request.name,
                list(request.dependencies),
                {key: list(deps.urns) for key, deps in request.propertyDependencies.items()},
                options,
            )
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            urn = self.make_urn(request.parent, request.type, request.name)
            self.registrations.append(
                Registration(
                    type=request.type,
                    name=request.name,
                    urn=urn,
                    inputs=rpc.deserialize_properties(request.object),
                    outputs=rpc.deserialize_properties(response.object),
                    options={"parent": request.parent, "dependencies": sorted(request.dependencies), **options},
                )
            )
        return response


@dataclass
class Evaluation:
    stack: str
    registrations: list[Registration]
    exports: dict[str, tuple[Any, bool]]  # name -> (value, is_secret)

    def of_type(self, type_: str) -> list[Registration]:
        return [r for r in self.registrations if r.type == type_]

    def named(self, name: str) -> Registration:
        matches = [r for r in self.registrations if r.name == name]
        if len(matches) != 1:
            raise KeyError(f"{len(matches)} registrations named {name}")
        return matches[0]

    @property
    def containers(self) -> dict[str, Registration]:
        return {r.inputs["name"]: r for r in self.of_type("docker:index/container:Container")}


def _config_values(raw: dict[str, Any]) -> dict[str, str]:
    return {f"{PROJECT}:{key}": value if isinstance(value, str) else json.dumps(value) for key, value in raw.items()}


def evaluate(
    stack: str,
    overrides: dict[str, Any] | None = None,
    mocks: pulumi.runtime.Mocks | None = None,
    secret_config: dict[str, str] | None = None,
) -> Evaluation:
    """Runs __main__.py once, with a fresh monitor, and returns what it registered."""
    config = _config_values(stack_config(stack, overrides))
    config.update({f"{PROJECT}:{key}": value for key, value in (secret_config or {}).items()})
    pulumi.runtime.set_all_config(config, [f"{PROJECT}:{key}" for key in secret_config or {}])
    monitor = RecordingMonitor(mocks or FakeMocks())
    runtime_settings.ROOT.set(None)
    pulumi.runtime.set_mocks(monitor.mocks, project=PROJECT, stack=stack, preview=False, monitor=monitor)
    exports: dict[str, tuple[Any, bool]] = {}

    def program() -> Any:
        runpy.run_path(str(PROJECT_DIR / "__main__.py"), run_name="__main__")
        root = runtime_settings.get_root_resource()
        outputs = dict(getattr(root, "outputs", {}))

        async def resolve() -> None:
            for name, value in outputs.items():
                output = pulumi.Output.from_input(value)
                exports[name] = (await output.future(), bool(await output.is_secret()))

        return resolve()

    pulumi_mocks.test(program)()
    return Evaluation(stack=stack, registrations=monitor.registrations, exports=exports)


def assert_children_parented(ev: Evaluation) -> None:
    """Every resource is the child of the component its name starts with, and every URN is unique."""
    components = {r.name: r.type for r in ev.registrations if r.type.startswith("transvidio:")}
    for registration in ev.registrations:
        if registration.type.startswith("transvidio:"):
            continue
        parent_type = registration.urn.split("::")[2].split("$")[0]
        assert parent_type.startswith("transvidio:"), registration.urn
        parent_name = next(n for n, t in components.items() if t == parent_type)
        assert registration.name.startswith(parent_name), (registration.name, parent_name)
    assert len({r.urn for r in ev.registrations}) == len(ev.registrations)
