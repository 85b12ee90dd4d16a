"""Every config file the program uploads, read by the server that reads it, in its own image.

For each stack, the program is evaluated and every container's uploads (the exact files,
paths, modes and owners it registers) are put into a throwaway container of that
container's image; the server then reads them the way it does in the stack:
- PostgreSQL starts on each node's postgresql.conf and pg_hba.conf with the parameters its
  Patroni config passes on the command line, and reports every line of both files as
  applied without error (pg_file_settings, pg_hba_file_rules) and every parameter as taken
  from the command line;
- Patroni accepts each node's config (`patroni --validate-config`, passwords added as the
  entrypoint adds them);
- each Redis node starts on its redis.conf and reports every directive's value;
- each Sentinel starts on its sentinel.conf and reports the monitored master and options;
- nginx starts through its entrypoint on nginx.conf, and `nginx -t` accepts it;
- Open MPI and PRRTE report every MCA parameter of the uploaded files with its value, and
  mpirun leaves ranks unbound as the binding policy says.
A directive a server does not know, or a value it rejects or silently ignores, fails here.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import tarfile
from collections.abc import Iterator
from typing import Any

import docker
import pytest
import yaml

from components import render
from components.container import LABEL_PREFIX
from components.topology import REDIS_MASTER_NAME, REDIS_PORT
from tests.e2e import certificates
from tests.e2e.apply import DockerApplyMocks
from tests.e2e.conftest import engine
from tests.program import Evaluation, Registration, evaluate, plain

# (stack, overrides, secret config): both stacks, and prod serving HTTPS.
STACKS = {
    "dev": ("dev", {}, {}),
    "prod": ("prod", {}, {}),
    "prod-https": ("prod", {"nginx": {"httpsPort": 8443}}, "self-signed"),
}
CHECK_TIMEOUT_SECONDS = 120


@pytest.fixture(scope="module")
def client() -> docker.DockerClient:
    return engine()


def self_signed_certificate() -> dict[str, str]:
    """A certificate and key for nginx, as an operator would set them as secret config."""
    issued = certificates.issue("transvidio.test")
    return {"tlsCertificate": issued.certificate, "tlsKey": issued.key}


@pytest.fixture(scope="module", params=sorted(STACKS))
def stack(request: pytest.FixtureRequest, client: docker.DockerClient) -> Iterator[tuple[Evaluation, dict[str, str]]]:
    """The stack's registrations, and its images (built as the apply builds them) by digest."""
    stack_name, overrides, secrets = STACKS[request.param]
    evaluation = evaluate(
        stack_name, overrides, secret_config=self_signed_certificate() if secrets == "self-signed" else None
    )
    builder = DockerApplyMocks(client, stack_name)
    images: dict[str, str] = {}
    for image in evaluation.of_type("docker:index/image:Image"):
        inputs = plain(image.inputs)
        builder._image(image.name, inputs)
        images[image.outputs["repo_digest"]] = inputs["imageName"]
    yield evaluation, images


def containers_of(evaluation: Evaluation, *roles: str) -> list[Registration]:
    return [r for _, r in sorted(evaluation.containers.items()) if role_of(r) in roles]


def role_of(registration: Registration) -> str:
    labels = {item["label"]: item["value"] for item in plain(registration.inputs["labels"])}
    return str(labels[f"{LABEL_PREFIX}.role"])


def uploads_of(registration: Registration) -> dict[str, dict[str, Any]]:
    return {upload["file"]: upload for upload in plain(registration.inputs.get("uploads", []))}


def run_check(
    client: docker.DockerClient,
    images: dict[str, str],
    registration: Registration,
    script: str,
    env: list[str] | None = None,
) -> str:
    """Runs `script` in a throwaway container of the registration's image, with its uploads.

    The image's own entrypoint is in $IMAGE_ENTRYPOINT. Returns the script's output; a
    non-zero exit fails the test with that output.
    """
    image = images[plain(registration.inputs["image"])]
    entrypoint = shlex.join(client.images.get(image).attrs["Config"]["Entrypoint"] or [])
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for path, upload in sorted(uploads_of(registration).items()):
            content = upload["content"].encode()
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode = len(content), int(upload.get("permissions", "0644"), 8)
            info.uid = info.gid = int(upload.get("owner", "0"))
            tar.addfile(info, io.BytesIO(content))
    container = client.containers.create(
        image,
        entrypoint=["bash", "-euo", "pipefail", "-c", script],
        environment=[*(env or []), f"IMAGE_ENTRYPOINT={entrypoint}"],
        network_mode="none",
    )
    try:
        container.put_archive("/", archive.getvalue())
        container.start()
        exit_code = container.wait(timeout=CHECK_TIMEOUT_SECONDS)["StatusCode"]
        output = str(container.logs(stdout=True, stderr=True).decode(errors="replace"))
    finally:
        container.remove(force=True)
    assert exit_code == 0, f"{registration.inputs['name']}: check exited {exit_code}:\n{output[-3000:]}"
    return output


def directives(text: str, separator: str) -> list[tuple[int, str, str]]:
    """(line number, name, value) of every directive of a rendered file, comments skipped."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition(separator)
            found.append((number, name.strip(), value.strip()))
    return found


def node_conf(registration: Registration, conf_dir: str, separator: str) -> tuple[str, list[tuple[int, str, str]]]:
    """The node's own config file, `<conf_dir>/<hostname>.conf`, and its directives."""
    path = f"{conf_dir}/{registration.inputs['hostname']}.conf"
    return path, directives(uploads_of(registration)[path]["content"], separator)


# Every node and Sentinel has the default user off: the checks ask as the operators' user.
ADMIN_CLI = "redis-cli --user admin --no-auth-warning"


def admin_env(evaluation: Evaluation) -> list[str]:
    [admin] = [
        r for r in evaluation.of_type("random:index/randomPassword:RandomPassword") if r.name == "secrets-redis-admin"
    ]
    return [f"REDISCLI_AUTH={plain(admin.outputs['result'])}"]


def until_redis_answers(port: str | int) -> str:
    """A shell line that waits (5 s at most) for a Redis or Sentinel on `port` to answer PING."""
    return f'for _ in $(seq 50); do [ "$({ADMIN_CLI} -p {port} ping 2>&1)" = PONG ] && break; sleep 0.1; done\n'


# --- PostgreSQL ----------------------------------------------------------------------------

PG_REPORT = """
export PATH=/usr/lib/postgresql/$(ls /usr/lib/postgresql)/bin:$PATH
initdb -D /tmp/data -U postgres --auth=trust >/dev/null
eval "postgres -D /tmp/data -c config_file=$CONF $OPTIONS" >/tmp/postgres.log 2>&1 &
for _ in $(seq 100); do pg_isready -q -h "$SOCKETS" && break; sleep 0.1; done || { cat /tmp/postgres.log; exit 1; }
psql -h "$SOCKETS" -U postgres -Atq -c "SELECT json_build_object(
  'settings', (SELECT json_agg(json_build_object('line', sourceline, 'name', name, 'setting', setting,
               'applied', applied, 'error', error) ORDER BY sourceline) FROM pg_file_settings
               WHERE sourcefile = '$CONF'),
  'sources', (SELECT json_object_agg(name, source) FROM pg_settings WHERE name = ANY(string_to_array('$NAMES', ','))),
  'hba', (SELECT json_agg(json_build_object('line', line_number, 'error', error) ORDER BY line_number)
          FROM pg_hba_file_rules),
  'ident', (SELECT json_agg(json_build_object('line', line_number, 'map', map_name, 'system', sys_name,
            'user', pg_username, 'error', error) ORDER BY line_number) FROM pg_ident_file_mappings))"
"""


def test_postgresql_applies_every_line_of_its_config_and_pg_hba_and_every_patroni_parameter(
    client: docker.DockerClient, stack: tuple[Evaluation, dict[str, str]]
) -> None:
    evaluation, images = stack
    nodes = containers_of(evaluation, "postgres-primary", "postgres-replica")
    assert nodes
    for node in nodes:
        uploads = uploads_of(node)
        conf = f"{render.POSTGRES_CONF_DIR}/postgresql.conf"
        rendered = directives(uploads[conf]["content"], "=")
        patroni = yaml.safe_load(
            uploads[f"{render.POSTGRES_CONF_DIR}/{node.inputs['hostname']}.patroni.yml"]["content"]
        )
        # What Patroni passes on the command line: its node-local and its cluster-wide parameters.
        parameters = {**patroni["postgresql"]["parameters"], **patroni["bootstrap"]["dcs"]["postgresql"]["parameters"]}
        options = " ".join(f"-c {name}={shlex.quote(str(value))}" for name, value in sorted(parameters.items()))
        script = (
            f"CONF={shlex.quote(conf)} SOCKETS={parameters['unix_socket_directories']} "
            f"OPTIONS={shlex.quote(options)} NAMES={','.join(sorted(parameters))}\n" + PG_REPORT
        )
        report = json.loads(run_check(client, images, node, script).strip().splitlines()[-1])
        expected = [
            {"line": line, "name": name, "setting": value.strip("'"), "applied": True, "error": None}
            for line, name, value in rendered
        ]
        assert report["settings"] == expected, node.inputs["name"]
        # PostgreSQL reports the hba_file and ident_file given at start as overrides, the others as given.
        overrides = ("hba_file", "ident_file")
        expected_sources = {name: "override" if name in overrides else "command line" for name in parameters}
        assert report["sources"] == expected_sources, node.inputs["name"]
        hba = uploads[f"{render.POSTGRES_CONF_DIR}/pg_hba.conf"]["content"]
        hba_lines = [line for line, _, _ in directives(hba, " ")]
        assert report["hba"] == [{"line": line, "error": None} for line in hba_lines], node.inputs["name"]
        ident = uploads[f"{render.POSTGRES_CONF_DIR}/pg_ident.conf"]["content"]
        assert report["ident"] == [
            {"line": line, "map": name, "system": value.split()[0], "user": value.split()[1], "error": None}
            for line, name, value in directives(ident, " ")
        ], node.inputs["name"]


PATRONI_VALIDATE = """
# The validator insists on reaching etcd: one runs here, on loopback, in place of the stack's.
etcd --data-dir /tmp/etcd --listen-client-urls http://127.0.0.1:2379 \\
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 >/tmp/etcd.log 2>&1 &
for _ in $(seq 100); do
    etcdctl --endpoints=http://127.0.0.1:2379 endpoint health >/dev/null 2>&1 && break
    sleep 0.1
done
python3 - "$CONFIG" <<'PY'
import sys
import yaml
config = yaml.safe_load(open(sys.argv[1]))
config["etcd3"]["hosts"] = ["127.0.0.1:2379"]
config["postgresql"]["bin_dir"] = "/usr/lib/postgresql/" + __import__("os").listdir("/usr/lib/postgresql")[0] + "/bin"
for user in config["postgresql"]["authentication"].values():
    user["password"] = "a-password-of-the-stack"
config["restapi"]["authentication"]["password"] = "a-password-of-the-stack"
yaml.safe_dump(config, open("/tmp/patroni.yml", "w"))
PY
patroni --validate-config /tmp/patroni.yml
echo validated
"""


def test_patroni_accepts_each_nodes_config(
    client: docker.DockerClient, stack: tuple[Evaluation, dict[str, str]]
) -> None:
    evaluation, images = stack
    for node in containers_of(evaluation, "postgres-primary", "postgres-replica"):
        config = f"{render.POSTGRES_CONF_DIR}/{node.inputs['hostname']}.patroni.yml"
        output = run_check(client, images, node, f"CONFIG={config}\n" + PATRONI_VALIDATE)
        assert output.strip().splitlines()[-1] == "validated", output


# --- Redis and Sentinel --------------------------------------------------------------------
# A Redis node refuses to start on a directive it does not know; a Sentinel starts anyway.


def test_each_redis_node_starts_on_its_config_and_reports_every_directive(
    client: docker.DockerClient, stack: tuple[Evaluation, dict[str, str]]
) -> None:
    evaluation, images = stack
    nodes = containers_of(evaluation, "redis")
    assert nodes
    for node in nodes:
        conf, rendered = node_conf(node, render.REDIS_CONF_DIR, " ")
        names = " ".join(sorted({name for _, name, _ in rendered}))
        script = (
            f"redis-server {conf} --daemonize yes --logfile /tmp/redis.log || {{ cat /tmp/redis.log; exit 1; }}\n"
            + until_redis_answers(REDIS_PORT)
            + f"for name in {names}; do {ADMIN_CLI} -p {REDIS_PORT} --json config get $name; done\n"
            # The ACL file: every user it defines is loaded, with its rules, and nothing else.
            + f"{ADMIN_CLI} -p {REDIS_PORT} acl list\n"
        )
        reported: dict[str, str] = {}
        output = run_check(client, images, node, script, env=admin_env(evaluation))
        acl = uploads_of(node)[render.REDIS_ACL_FILE]["content"]
        assert loaded_users(output) == {line.split()[1] for line in acl.splitlines()}, node.inputs["name"]
        for line in output.splitlines():
            if line.startswith("{"):
                reported.update(json.loads(line))
        assert reported == {name: value for _, name, value in rendered}, node.inputs["name"]


def test_each_sentinel_starts_on_its_config_and_monitors_the_master_as_rendered(
    client: docker.DockerClient, stack: tuple[Evaluation, dict[str, str]]
) -> None:
    evaluation, images = stack
    sentinels = containers_of(evaluation, "sentinel")
    assert sentinels
    for sentinel in sentinels:
        _, rendered = node_conf(sentinel, render.REDIS_CONF_DIR, " ")
        port = dict((name, value) for _, name, value in rendered)["port"]
        # Through the container's entrypoint, which adds the users and passwords: Sentinel
        # then rewrites the config on its volume from what it parsed.
        script = (
            f"{shlex.join(plain(sentinel.inputs['entrypoints']))} >/tmp/sentinel.log 2>&1 &\n"
            + until_redis_answers(port)
            + f'[ "$({ADMIN_CLI} -p {port} ping 2>&1)" = PONG ] || {{ cat /tmp/sentinel.log; exit 1; }}\n'
            + f"{ADMIN_CLI} -p {port} --json sentinel masters\n"
            f"{ADMIN_CLI} -p {port} --json sentinel config get '*'\n"
            f"{ADMIN_CLI} -p {port} acl list\n"
            f"{ADMIN_CLI} -p {port} sentinel flushconfig >/dev/null\n"
            # Sentinel keeps a line it does not understand, commented "# ???", instead of failing.
            "! grep -n '^# ???' /data/sentinel.conf\n"
            "echo '=== rewritten'; cat /data/sentinel.conf\n"
        )
        # With no network here, the Sentinel finds and announces its address on loopback.
        env = [e for e in plain(sentinel.inputs["envs"]) if not e.startswith("DATA_SUBNET=")]
        output = run_check(
            client, images, sentinel, script, env=[*env, "DATA_SUBNET=127.0.0.0/8", *admin_env(evaluation)]
        )
        reported, rewritten = output.split("=== rewritten\n", 1)
        acl = uploads_of(sentinel)[render.SENTINEL_ACL_FILE]["content"]
        assert loaded_users(reported) == {line.split()[1] for line in acl.splitlines()}, sentinel.inputs["name"]
        lines = [json.loads(line) for line in reported.splitlines() if line[:1] in "[{"]
        masters, options = lines[0], lines[1]
        expected_master: dict[str, str] = {}
        expected_options: dict[str, str] = {}
        for _, name, value in rendered:
            if name != "sentinel":
                continue
            option, _, rest = value.partition(" ")
            if option == "monitor":
                master_name, ip, master_port, quorum = rest.split()
                expected_master.update(name=master_name, ip=ip, port=master_port, quorum=quorum)
            elif option == "auth-user":  # not reported by SENTINEL MASTERS: Sentinel wrote back what it took
                assert f"sentinel {option} {rest}" in rewritten.splitlines(), sentinel.inputs["name"]
            elif rest.startswith(f"{REDIS_MASTER_NAME} "):
                expected_master[option] = rest.split(" ", 1)[1]
            else:
                expected_options[option] = rest
        assert len(masters) == 1, masters
        assert {key: masters[0][key] for key in expected_master} == expected_master, sentinel.inputs["name"]
        assert {key: options[key] for key in expected_options} == expected_options, sentinel.inputs["name"]
        assert options["announce-ip"] == "127.0.0.1", sentinel.inputs["name"]  # its own address, found at start


def loaded_users(acl_list: str) -> set[str]:
    """The user names in `ACL LIST` output."""
    return {line.split()[1] for line in acl_list.splitlines() if line.startswith("user ")}


# --- nginx -----------------------------------------------------------------------------------


def test_nginx_starts_on_its_config_through_its_entrypoint(
    client: docker.DockerClient, stack: tuple[Evaluation, dict[str, str]]
) -> None:
    evaluation, images = stack
    [nginx] = containers_of(evaluation, "nginx")
    conf = f"{render.NGINX_CONF_DIR}/nginx.conf"
    [pid_file] = [v.rstrip(";") for _, name, v in directives(uploads_of(nginx)[conf]["content"], " ") if name == "pid"]
    # The entrypoint writes the upstream include, then starts nginx on the uploaded config.
    script = (
        "$IMAGE_ENTRYPOINT >/tmp/entrypoint.log 2>&1 &\n"
        f"for _ in $(seq 100); do [ -s {pid_file} ] && break; sleep 0.1; done\n"
        f"[ -s {pid_file} ] || {{ cat /tmp/entrypoint.log; exit 1; }}\n"
        f"nginx -t -c {conf} 2>&1\n"
    )
    output = run_check(client, images, nginx, script, env=plain(nginx.inputs["envs"]))
    assert f"configuration file {conf} test is successful" in output


# --- Open MPI and PRRTE ------------------------------------------------------------------------


def test_open_mpi_and_prrte_take_every_mca_parameter_of_the_uploaded_files(
    client: docker.DockerClient, stack: tuple[Evaluation, dict[str, str]]
) -> None:
    evaluation, images = stack
    [master] = containers_of(evaluation, "mpi-master")
    uploads = uploads_of(master)
    ompi_file = next(path for path in uploads if path.endswith("/.openmpi/mca-params.conf"))
    prte_file = next(path for path in uploads if path.endswith("/.prte/mca-params.conf"))
    script = (
        "ompi_info --param all all --level 9 --parsable\n"
        "echo '=== prte_info'\n"
        "prte_info --all\n"
        "echo '=== bindings'\n"
        'echo "$(hostname) slots=2" >/tmp/hostfile\n'
        "mpirun --hostfile /tmp/hostfile -np 2 --report-bindings true 2>&1 | tr -d '\\000'\n"
    )
    output = run_check(client, images, master, f"su app -s /bin/bash -c {shlex.quote(script)}")
    ompi_info, rest = output.split("=== prte_info\n", 1)
    prte_info, bindings = rest.split("=== bindings\n", 1)

    for line, name, value in directives(uploads[ompi_file]["content"], "="):
        source = f":param:{name}:source:file ({ompi_file}:{line})"
        assert f":param:{name}:value:{value}\n" in ompi_info, f"Open MPI does not take {name} = {value}"
        assert source in ompi_info, f"Open MPI does not read {name} from {ompi_file}"

    # prte_info wraps its report: values are compared on the text with whitespace folded.
    folded = re.sub(r"\s+", " ", prte_info)
    for _, name, value in directives(uploads[prte_file]["content"], "="):
        if name == "hwloc_default_binding_policy":  # not listed by prte_info: its effect is checked below
            continue
        assert f'"{name}" (current value: "{value}"' in folded, f"PRRTE does not take {name} = {value}"
    ranks = [line for line in bindings.splitlines() if "Rank" in line]
    assert len(ranks) == 2 and all("is not bound" in line for line in ranks), bindings
