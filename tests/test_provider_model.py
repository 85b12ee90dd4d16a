"""The e2e harness's model of the provider (tests/e2e/provider.py), checked on its own."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.e2e import provider, swarm_target

CONTAINER = "docker:index/container:Container"


@pytest.mark.parametrize(
    ("text", "nanoseconds", "canonical"),
    [
        ("5s", 5 * 10**9, "5s"),
        ("60s", 60 * 10**9, "1m0s"),
        ("90s", 90 * 10**9, "1m30s"),
        ("1m30s", 90 * 10**9, "1m30s"),
        ("120s", 120 * 10**9, "2m0s"),
        ("1.5s", 1_500_000_000, "1.5s"),
        ("500ms", 500_000_000, "500ms"),
        ("1h", 3600 * 10**9, "1h0m0s"),
        ("0s", 0, "0s"),
        ("", 0, "0s"),
    ],
)
def test_durations_read_back_as_go_prints_them(text: str, nanoseconds: int, canonical: str) -> None:
    assert provider.parse_duration(text) == nanoseconds
    assert provider.go_duration(nanoseconds) == canonical


@pytest.mark.parametrize("text", ["5", "s", "5x", "1m3"])
def test_unparsable_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="unparsable duration"):
        provider.parse_duration(text)


def state_after_create(inputs: dict[str, Any], **read_back: Any) -> dict[str, Any]:
    return {**provider.planned(CONTAINER, inputs, {}), **read_back}


BASE: dict[str, Any] = {
    "name": "c",
    "image": "sha256:1",
    "memory": 512,
    "healthcheck": {"tests": ["CMD", "a", "b"], "interval": "5s", "startPeriod": "1m0s"},
    "networksAdvanced": [{"name": "n", "aliases": ["x", "y"]}],
    "capabilities": {"drops": ["ALL"], "adds": ["CHOWN", "KILL"]},
}


def test_the_same_inputs_against_their_own_read_back_plan_nothing() -> None:
    state = state_after_create(BASE, hostname="c", logDriver="json-file")  # Computed: read back
    assert provider.diff(CONTAINER, BASE, state) == {}


def test_a_non_canonical_duration_is_a_change_every_time() -> None:
    state = state_after_create(BASE)
    inputs = {**BASE, "healthcheck": {**BASE["healthcheck"], "startPeriod": "60s"}}
    assert provider.diff(CONTAINER, inputs, state) == {"healthcheck": provider.NOOP_UPDATE}


def test_set_attributes_ignore_order_and_lists_do_not() -> None:
    state = state_after_create(BASE)
    reordered_sets = {
        **BASE,
        "networksAdvanced": [{"name": "n", "aliases": ["y", "x"]}],
        "capabilities": {"drops": ["ALL"], "adds": ["KILL", "CHOWN"]},
    }
    assert provider.diff(CONTAINER, reordered_sets, state) == {}
    reordered_test = {**BASE, "healthcheck": {**BASE["healthcheck"], "tests": ["CMD", "b", "a"]}}
    assert provider.diff(CONTAINER, reordered_test, state) == {"healthcheck": provider.NOOP_UPDATE}


def test_memory_updates_in_place_and_an_unset_swap_reads_back_as_a_change() -> None:
    state = state_after_create(BASE, memorySwap=1024)  # Docker's default: twice the memory
    assert provider.diff(CONTAINER, BASE, state) == {"memorySwap": provider.UPDATE}
    with_swap = {**BASE, "memorySwap": 512}
    state = state_after_create(with_swap, memorySwap=512)
    assert provider.diff(CONTAINER, {**with_swap, "memory": 2048, "memorySwap": 2048}, state) == {
        "memory": provider.UPDATE,
        "memorySwap": provider.UPDATE,
    }


def test_force_new_attributes_replace_and_computed_ones_keep_the_state() -> None:
    state = state_after_create(BASE, hostname="from-docker", command=["run"])
    assert provider.diff(CONTAINER, BASE, state) == {}  # unset Computed: what was read back stays
    assert provider.diff(CONTAINER, {**BASE, "image": "sha256:2"}, state) == {"image": provider.REPLACE}
    assert provider.diff(CONTAINER, {**BASE, "wait": True}, state) == {"wait": provider.STATE}


def test_an_input_the_model_does_not_know_is_refused() -> None:
    with pytest.raises(KeyError, match="no row for input"):
        provider.diff(CONTAINER, {**BASE, "privileged": True}, state_after_create(BASE))


def test_the_read_back_of_a_container() -> None:
    inspect = {
        "Name": "/c",
        "Image": "sha256:1",
        "Config": {
            "Hostname": "c",
            "Image": "sha256:1",
            "Cmd": None,
            "Entrypoint": ["/e"],
            "User": "10:10",
            "Healthcheck": {"Test": ["CMD", "a"], "Interval": 5 * 10**9, "Timeout": 0, "StartPeriod": 60 * 10**9},
        },
        "HostConfig": {
            "RestartPolicy": {"Name": "unless-stopped"},
            "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m"}},
            "Memory": 512 * provider.MB,
            "MemorySwap": 1024 * provider.MB,
            "ShmSize": 64 * provider.MB,
            "SecurityOpt": ["no-new-privileges:true"],
            "CapAdd": ["CHOWN"],
            "CapDrop": ["ALL"],
            "ExtraHosts": ["db:10.0.0.1"],
            "NetworkMode": "bridge",
            "NanoCpus": 1_500_000_000,
        },
        "NetworkSettings": {"Ports": {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "80"}]}},
        "State": {"Running": True},
    }
    applied = {"image": "sha256:1", "ports": [{"internal": 8080}], "logOpts": {"max-size": "10m"}, "envs": ["A=1"]}
    state = provider.read_container(inspect, applied)
    assert state["healthcheck"] == {
        "tests": ["CMD", "a"],
        "interval": "5s",
        "timeout": "0s",
        "startPeriod": "1m0s",
        "startInterval": "0s",
        "retries": 0,
    }
    assert (state["memory"], state["memorySwap"], state["shmSize"]) == (512, 1024, 64)
    assert state["ports"] == [{"internal": 8080, "external": 80, "ip": "127.0.0.1", "protocol": "tcp"}]
    assert state["hosts"] == [{"host": "db", "ip": "10.0.0.1"}]
    assert state["capabilities"] == {"adds": ["CHOWN"], "drops": ["ALL"]}
    assert state["envs"] == ["A=1"]  # never read: the applied value stays
    assert (state["name"], state["restart"], state["user"]) == ("c", "unless-stopped", "10:10")
    assert (state["networkMode"], state["cpus"]) == ("bridge", "1.5")


@pytest.mark.parametrize(
    ("nanos", "text"),
    [(10**9, "1.0"), (2 * 10**9, "2.0"), (5 * 10**8, "0.5"), (25 * 10**7, "0.25"), (15 * 10**8, "1.5"),
     (1005 * 10**7, "10.1"), (10 * 10**9, "10."), (64 * 10**9, "64.0"), (205 * 10**8, "20.5"), (0, "0")],
)  # fmt: skip
def test_cpus_are_read_back_as_the_provider_prints_them(nanos: int, text: str) -> None:
    assert provider.go_nano_decimal(nanos) == text
    assert nanos in (0, 1005 * 10**7) or provider.parse_cpus(text) == nanos  # 10.05 reads back rounded


def test_the_programs_cpu_limits_are_in_the_form_read_back() -> None:
    from components.settings import cpus, provider_cpus

    for text in ("0.1", "0.25", "0.5", "1", "1.25", "1.5", "2", "2.05", "10", "20.5", "64"):
        millicpus = cpus("cpus", text)
        assert provider.parse_cpus(provider_cpus(millicpus)) == millicpus * 10**6, text  # what is set
        assert provider_cpus(millicpus) == provider.go_nano_decimal(millicpus * 10**6), text  # read back


def test_an_unset_network_mode_is_the_schema_default_and_plans_no_change() -> None:
    state = {**state_after_create(BASE), "networkMode": "bridge"}
    assert "networkMode" not in provider.diff(CONTAINER, BASE, state)
    assert provider.diff(CONTAINER, {**BASE, "networkMode": "none"}, state)["networkMode"] == provider.REPLACE


class ManagerAroundAnUpdate:
    """A swarm manager's answers around one service update, as seen here: the update request
    clears the service's UpdateStatus, the orchestrator starts the update a moment later (a
    new StartedAt), then reports each of `statuses` in turn (the last one for good). The one
    task keeps running throughout (start-first: the old task serves until the new is healthy)."""

    def __init__(self, statuses: list[dict[str, str] | None]) -> None:
        self.statuses = statuses
        self.spec: dict[str, Any] = {"Mode": {"Replicated": {"Replicas": 1}}, "TaskTemplate": {"Image": "v1"}}
        self.updated = False

    def inspect_service(self, service_id: str) -> dict[str, Any]:
        if not self.updated:
            status: dict[str, str] | None = {"State": "completed", "StartedAt": "the last update"}
        else:
            status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {"Spec": self.spec, "Version": {"Index": 7}, **({"UpdateStatus": status} if status else {})}

    def _url(self, path: str) -> str:
        return path

    def _post_json(self, url: str, data: dict[str, Any], params: dict[str, Any]) -> None:
        self.spec, self.updated = data, True

    def _result(self, response: None, json: bool) -> dict[str, Any]:
        return {}

    def tasks(self, filters: dict[str, str]) -> list[dict[str, Any]]:
        return [{"Status": {"State": "running"}}]


def update_through(manager: ManagerAroundAnUpdate, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    monkeypatch.setattr(
        swarm_target,
        "service_spec",
        lambda inputs: {"Mode": {"Replicated": {"Replicas": 1}}, "TaskTemplate": {"Image": inputs["image"]}},
    )
    client: Any = type("Client", (), {"api": manager})()
    return swarm_target.update_service(client, "backend", dict(UPDATE))


UPDATE = {"name": "backend", "image": "v2", "convergeConfig": {"timeout": "5m"}}
ROLLED_BACK = {"State": "rollback_completed", "StartedAt": "this update", "Message": "rollback completed"}


@pytest.mark.parametrize("cleared_for", [0, 1, 3])
def test_an_update_that_rolls_back_fails_the_apply_however_long_it_took_to_start(
    cleared_for: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Seen on a busy swarm: no UpdateStatus for a while after the request, one task running.
    rolling = {"State": "updating", "StartedAt": "this update"}
    manager = ManagerAroundAnUpdate([None] * cleared_for + [rolling, ROLLED_BACK])
    with pytest.raises(swarm_target.ServiceError, match="backend: update rollback completed: rollback completed"):
        update_through(manager, monkeypatch)


def test_an_update_that_completes_is_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    completed = {"State": "completed", "StartedAt": "this update"}
    manager = ManagerAroundAnUpdate([None, {"State": "updating", "StartedAt": "this update"}, completed])
    assert update_through(manager, monkeypatch) == UPDATE
