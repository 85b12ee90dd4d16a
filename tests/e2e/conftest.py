"""End-to-end fixtures: the program's own registrations applied to a real engine.

`make e2e` prepares the engine (Podman's Docker API here, or any engine DOCKER_HOST
points to) and the locally made base image. Outside CI, a missing engine skips these
tests with a message naming what to install; in CI it fails them.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors
import pytest

from components.container import LABEL_PREFIX, UNWATCHED_HEALTHCHECK_INTERVAL_SECONDS
from components.settings import parse
from components.topology import Topology
from tests.e2e import report
from tests.e2e.apply import ApplyError, DockerApplyMocks, Plan, is_podman, run_healthcheck, teardown, up, wait_healthy
from tests.program import Evaluation, plain, stack_config

# The e2e stacks are the real Pulumi.dev.yaml / Pulumi.prod.yaml plus these overrides,
# and nothing else. None are needed on these machines.
E2E_OVERRIDES: dict[str, dict[str, Any]] = {"dev": {}, "prod": {}}


def engine() -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except (docker.errors.DockerException, OSError) as error:
        message = (
            f"no container engine at DOCKER_HOST={os.environ.get('DOCKER_HOST', '(unset)')} ({error}); "
            "run `make e2e` (installs Debian's podman, netavark, aardvark-dns, runc, debootstrap) "
            "or point DOCKER_HOST to a Docker engine"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return client


# What Podman 4.3's Docker-compatible API reports differently from what it was given, so the
# provider would see a change on every `pulumi up` and replace the container (seen here):
# CapAdd/CapDrop relative to Podman's default set instead of ALL + adds, SecurityOpt
# "no-new-privileges" without ":true", LogConfig.Config empty. Docker reports them as given.
PODMAN_READBACK_DRIFT = frozenset({"capabilities", "logOpts", "securityOpts"})


def readback_drift(client: docker.DockerClient) -> frozenset[str]:
    """Container attributes this engine never reads back as applied (nothing on Docker)."""
    return PODMAN_READBACK_DRIFT if is_podman(client) else frozenset()


def engine_name(client: docker.DockerClient) -> str:
    version = client.version()
    return f"{'Podman' if is_podman(client) else 'Docker'} {version.get('Version', '?')}"


class HealthTicker(threading.Thread):
    """Runs every container's healthcheck every few seconds, as the engine's timers would.

    Podman schedules healthchecks with systemd timers; without systemd they never run,
    so status would stay 'starting'. Docker runs them itself: then this does nothing.
    """

    def __init__(self, client: docker.DockerClient, stack: str, interval: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.client, self.stack, self.interval = client, stack, interval
        self.stopped = threading.Event()

    def run(self) -> None:
        if not is_podman(self.client):
            return
        while not self.stopped.wait(self.interval):
            with contextlib.suppress(docker.errors.DockerException, OSError):
                for container in self.client.containers.list(filters={"label": f"{LABEL_PREFIX}.stack={self.stack}"}):
                    if self.stopped.is_set():
                        break
                    run_healthcheck(self.client, container.name)


@dataclass
class Deployment:
    """A stack brought up for real, with what the tests need to reach it."""

    stack: str
    client: docker.DockerClient
    evaluation: Evaluation
    mocks: DockerApplyMocks
    overrides: dict[str, Any] = field(default_factory=dict)
    secret_config: dict[str, str] = field(default_factory=dict)  # `pulumi config set --secret` values
    seconds_to_healthy: float = 0.0
    container_names: list[str] = field(default_factory=list)

    @property
    def topology(self) -> Topology:
        return Topology(
            parse(self.stack, stack_config(self.stack, self.overrides), secrets_set=frozenset(self.secret_config))
        )

    def assert_plans_nothing(self, plan: Plan) -> None:
        """No change planned; on an engine with read-back drift, only the drift's replacements."""
        drift = readback_drift(self.client)
        assert plan.counts()["create"] == plan.counts()["update"] == plan.counts()["delete"] == 0, str(plan)
        drifting = [s for s in plan.steps if s.op == "replace" and set(s.attributes) <= drift and s.attributes]
        assert len(drifting) == plan.counts()["replace"], str(plan)

    def apply(
        self,
        overrides: dict[str, Any] | None = None,
        refresh: bool = False,
        secret_config: dict[str, str] | None = None,
    ) -> Plan:
        """`pulumi up` again (with `--refresh` when asked), the stack's config merged with
        `overrides`, and `secret_config` added to the secrets set so far."""
        config = {**self.overrides}
        for key, value in (overrides or {}).items():
            config[key] = {**config.get(key, {}), **value}
        secrets = {**self.secret_config, **(secret_config or {})}
        self.evaluation, plan = up(self.mocks, self.stack, config, refresh=refresh, secret_config=secrets or None)
        self.overrides, self.secret_config = config, secrets
        self.container_names = sorted(self.evaluation.containers)
        return plan

    def name(self, hostname: str) -> str:
        return f"transvidio-{self.stack}-{hostname}"

    def export(self, name: str) -> Any:
        return plain(self.evaluation.exports[name][0])

    def api_token(self, name: str | None = None) -> str:
        """An API token from the stack's outputs: `name`'s, or the first configured one's."""
        tokens = self.export("apiTokens")
        return str(tokens[name or self.topology.settings.backend.api_tokens[0]])

    def exec(self, hostname: str, command: list[str], user: str | None = None) -> tuple[int, str]:
        result = self.client.containers.get(self.name(hostname)).exec_run(command, user=user or "")
        return result.exit_code, result.output.decode(errors="replace")

    def assert_all_healthy(self) -> None:
        """Exactly the topology's containers exist, and the engine itself reports each healthy:
        its own timer ran the check as configured (the first run comes one interval after
        the start)."""
        assert self.container_names == sorted(node.container_name for node in self.topology.all_nodes)
        deadline = time.monotonic() + UNWATCHED_HEALTHCHECK_INTERVAL_SECONDS + 30
        for name in self.container_names:
            wait_healthy(self.client, name, timeout=max(1.0, deadline - time.monotonic()))

    def wait_all_healthy(self, timeout: float = 300) -> float:
        """Until every container is ready: its own healthcheck passes (run now if the engine's
        timer has not run it yet)."""
        started = time.monotonic()
        for container in self.container_names:
            remaining = max(1.0, timeout - (time.monotonic() - started))
            wait_healthy(self.client, container, timeout=remaining, check_now=True)
        return time.monotonic() - started


@contextlib.contextmanager
def deployed(
    stack: str,
    overrides: dict[str, Any] | None = None,
    health_ticker: bool = True,
    secret_config: dict[str, str] | None = None,
    on_created: dict[str, Callable[[str], None]] | None = None,
) -> Iterator[Deployment]:
    """Brings the stack up (E2E_OVERRIDES, then `overrides`, e.g. a benchmark's settings, and
    `secret_config` as `pulumi config set --secret` would set it; `on_created` as in
    DockerApplyMocks).

    Benchmarks pass health_ticker=False: on Podman every healthcheck is an exec, which
    on a 2-core machine is load that the figures should not include.
    """
    client = engine()
    teardown(client, stack)  # leftovers of a killed run
    mocks = DockerApplyMocks(client, stack)
    mocks.on_created.update(on_created or {})
    started = time.monotonic()
    ticker = HealthTicker(client, stack)
    try:
        config = {**E2E_OVERRIDES[stack]}
        for key, value in (overrides or {}).items():
            config[key] = {**config.get(key, {}), **value}
        evaluation, _ = up(mocks, stack, config, secret_config=secret_config)
        deployment = Deployment(stack, client, evaluation, mocks, overrides=config, secret_config=secret_config or {})
        deployment.container_names = sorted(evaluation.containers)
        deployment.wait_all_healthy()
        deployment.seconds_to_healthy = time.monotonic() - started
        builds = ", ".join(f"{k.removesuffix('-image')} {v:.0f}s" for k, v in sorted(mocks.build_seconds.items()))
        report.LINES.append(
            f"{stack} on {engine_name(client)}: {len(deployment.container_names)} containers healthy "
            f"{deployment.seconds_to_healthy:.1f}s after the apply started; image builds: {builds}"
        )
        if health_ticker:
            ticker.start()
        yield deployment
    finally:
        # Let a healthcheck round finish before removing containers: a healthcheck exec
        # racing a removal is where Podman 4.3 can stop answering.
        ticker.stopped.set()
        if ticker.is_alive():
            ticker.join(timeout=120)
        if not os.environ.get("E2E_KEEP"):
            teardown(client, stack)


__all__ = ["ApplyError", "Deployment", "Plan", "deployed", "engine"]
