"""PostgreSQL backups in an S3-compatible bucket, made for real on the dev stack.

`postgres.backupRepository: s3` with its endpoint, bucket and the operator's secrets (the
key, its secret, and the CA that signed the endpoint's certificate). The endpoint is
moto's S3 server (tests/e2e/s3), over HTTPS with a certificate this module makes, on the
stack's egress network: the only route out the PostgreSQL nodes have. The WAL archive
and a full backup go to the bucket; every PostgreSQL volume is wiped and the cluster is
restored from the bucket to its latest write.
"""

from __future__ import annotations

import functools
import io
import tarfile
from collections.abc import Callable, Iterator

import docker
import pytest

from components.container import LABEL_PREFIX
from components.settings import parse
from tests.e2e import certificates, chaos
from tests.e2e.apply import DockerApplyMocks
from tests.e2e.conftest import Deployment, deployed, engine
from tests.program import stack_config

STACK = "dev"
ENDPOINT = "s3.e2e"  # its alias on the egress network, and the name its certificate is for
BUCKET = "transvidio-e2e"
S3_IMAGE = "transvidio-e2e-s3:latest"
ROWS = 250


AUTHORITY = certificates.issue("transvidio e2e CA", ca=True)
SERVER = certificates.issue(ENDPOINT, signer=AUTHORITY, dns_names=(ENDPOINT,))
CA, SERVER_CERTIFICATE, SERVER_KEY = AUTHORITY.certificate, SERVER.certificate, SERVER.key
SECRETS = {"s3AccessKeyId": "e2eaccesskey", "s3SecretAccessKey": "e2e/secret+access=key", "s3CaCertificate": CA}
OVERRIDES = {
    "postgres": {
        "backupRepository": "s3",
        "s3Endpoint": f"{ENDPOINT}:8443",
        "s3Bucket": BUCKET,
        "s3UriStyle": "path",
        "archiveTimeoutSeconds": 10,
    }
}


def build_s3(client: docker.DockerClient) -> None:
    base = parse(STACK, stack_config(STACK)).images.base
    build = {"context": "tests/e2e/s3", "dockerfile": "tests/e2e/s3/Dockerfile", "args": {"BASE_IMAGE": base}}
    DockerApplyMocks(client, STACK)._image("e2e-s3", {"imageName": S3_IMAGE, "build": build})


def start_s3(client: docker.DockerClient, egress_network_id: str) -> None:
    """moto's server on the stack's egress network, its bucket created: called as soon as
    the network exists, so the endpoint is there before the PostgreSQL nodes, as a real
    bucket would be."""
    network = client.networks.get(egress_network_id)
    container = client.containers.create(
        S3_IMAGE,
        name=f"transvidio-{STACK}-e2e-s3",
        labels={f"{LABEL_PREFIX}.stack": STACK},  # the stack's teardown removes it
        network=network.name,
    )
    network.disconnect(container)
    network.connect(container, aliases=[ENDPOINT])
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, text in (("server.crt", SERVER_CERTIFICATE), ("server.key", SERVER_KEY)):
            info = tarfile.TarInfo(f"srv/s3/{name}")
            info.size, info.mode, info.uid, info.gid = len(text), 0o400, 10099, 10099
            tar.addfile(info, io.BytesIO(text.encode()))
    container.put_archive("/", archive.getvalue())
    container.start()
    create_bucket = (
        "import ssl, time, urllib.request\n"
        "context = ssl._create_unverified_context()\n"
        "for _ in range(100):\n"
        "    try:\n"
        f"        urllib.request.urlopen(urllib.request.Request('https://127.0.0.1:8443/{BUCKET}', method='PUT'),"
        " context=context, timeout=5); break\n"
        "    except OSError: time.sleep(0.2)\n"
        "else: raise SystemExit('moto did not answer')\n"
    )
    result = container.exec_run(["python3", "-c", create_bucket])
    assert result.exit_code == 0, result.output.decode(errors="replace")


@pytest.fixture(scope="module")
def dev() -> Iterator[Deployment]:
    client = engine()
    build_s3(client)
    hooks: dict[str, Callable[[str], None]] = {"network-egress": functools.partial(start_s3, client)}
    with deployed(STACK, OVERRIDES, secret_config=SECRETS, on_created=hooks) as deployment:
        yield deployment


def rows(dev: Deployment) -> int:
    with chaos.pg_writer(dev) as conn:
        row = conn.execute("SELECT count(*) FROM s3_check").fetchone()
    assert row is not None
    return int(row[0])


def test_backups_and_the_wal_archive_go_to_the_bucket_and_a_wiped_cluster_comes_back_from_it(dev: Deployment) -> None:
    full = chaos.wait_for(lambda: [b for b in chaos.pg_backups(dev) if b["type"] == "full"], 180, "a full backup in S3")
    primary = chaos.pg_primary(dev)
    # Nothing on the node's disk: the repository is the bucket (`repo-ls` lists the bucket's path).
    code, listing = dev.exec(primary, ["pgbackrest", "repo-ls", "backup/transvidio"])
    assert code == 0 and full[0]["label"] in listing, listing
    code, output = dev.exec(primary, ["ls", "-A", "/var/lib/pgbackrest"])
    assert (code, output.strip()) == (0, ""), output
    with chaos.pg_writer(dev) as conn:
        conn.execute("CREATE TABLE s3_check (n int)")
        conn.execute("INSERT INTO s3_check SELECT generate_series(1, %s)", (ROWS,))
    chaos.archive_everything(dev)

    chaos.wipe_postgres(dev)
    chaos.restore_postgres(dev, "latest")
    assert rows(dev) == ROWS
    # The restored primary archives to the bucket again.
    chaos.archive_everything(dev)


def test_the_s3_credentials_are_in_the_store_and_no_container_environment(dev: Deployment) -> None:
    primary = chaos.pg_primary(dev)
    code, mode = dev.exec(primary, ["stat", "-c", "%a %U", "/etc/transvidio/secrets/pgbackrest-s3.conf"])
    assert (code, mode.strip()) == (0, "400 postgres")
    for container in dev.client.containers.list(filters={"label": f"{LABEL_PREFIX}.stack={STACK}"}):
        environment = "\n".join(container.attrs["Config"]["Env"] or [])
        assert SECRETS["s3SecretAccessKey"] not in environment, container.name
