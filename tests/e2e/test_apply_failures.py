"""Bad cases: an apply that cannot succeed fails with the resource's name and its output."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator

import docker
import pytest

from tests.e2e.apply import ApplyError, DockerApplyMocks, teardown, up, wait_healthy
from tests.e2e.conftest import engine
from tests.program import evaluate

STACK = "dev"
BROKEN_BASE = "transvidio-e2e/broken-base:latest"


@pytest.fixture
def client() -> Iterator[docker.DockerClient]:
    client = engine()
    teardown(client, STACK)
    yield client
    teardown(client, STACK)


def make_broken_base(client: docker.DockerClient) -> None:
    """An image with no shell and no apt: every Dockerfile's first RUN fails on it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("etc/motd")
        content = b"not a Debian\n"
        info.size = len(content)
        archive.addfile(info, io.BytesIO(content))
    client.api.import_image_from_data(buffer.getvalue(), repository=BROKEN_BASE.split(":")[0], tag="latest")


def test_a_failing_build_names_the_image_and_shows_its_output(client: docker.DockerClient) -> None:
    make_broken_base(client)
    with pytest.raises(Exception) as raised:
        up(DockerApplyMocks(client, STACK), STACK, {"images": {"base": BROKEN_BASE}})
    message = str(raised.value)
    assert "failed to build" in message
    assert any(
        f"{role}-image (transvidio-dev-{role}:latest)" in message
        for role in ("postgres", "redis", "mpi", "backend", "nginx")
    )
    assert "RUN" in message or "/bin/sh" in message  # the tail of the build output
    assert client.containers.list(all=True, filters={"label": "io.transvidio.stack=dev"}) == []


def test_a_container_that_never_gets_healthy_names_itself_and_shows_its_logs(client: docker.DockerClient) -> None:
    # A user's backend image that is no backend at all: the base image (its shell exits).
    mocks = DockerApplyMocks(client, STACK)
    evaluation = evaluate(STACK, {"images": {"backend": "debian:trixie-slim"}}, mocks=mocks)
    mocks.wait_idle()
    backend = "transvidio-dev-backend-1"
    assert backend in evaluation.containers
    with pytest.raises(ApplyError) as raised:
        wait_healthy(client, backend, timeout=20)
    assert backend in str(raised.value)
    assert "last logs" in str(raised.value)


def test_an_apply_onto_a_container_the_stack_does_not_manage_fails_naming_it(client: docker.DockerClient) -> None:
    squatter = "transvidio-dev-postgres-primary"
    client.containers.create(
        "debian:trixie-slim", ["sleep", "600"], name=squatter, labels={"io.transvidio.stack": STACK}
    )
    with pytest.raises(Exception) as raised:
        up(DockerApplyMocks(client, STACK), STACK)
    assert f"container {squatter}: the name is already in use" in str(raised.value)
    # Nothing adopted it: it is still the squatter.
    assert client.containers.get(squatter).attrs["Config"]["Cmd"] == ["sleep", "600"]
