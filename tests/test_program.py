"""The whole program under Pulumi mocks, for both real stack files."""

from __future__ import annotations

import hashlib
import ipaddress
import json
from functools import cache
from typing import Any

import pytest

from components import redis, render
from components.container import SERVICE_UIDS
from components.secrets import GENERATED
from components.settings import parse
from components.topology import Topology
from tests.program import Evaluation, Registration, assert_children_parented, evaluate, is_secret, plain, stack_config

CONTAINER = "docker:index/container:Container"
STACKS = ("dev", "prod")
# What an operator's certificate and key look like to the checks (not a usable pair).
PEM_PAIR = {
    "tlsCertificate": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    "tlsKey": "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n",
}


@cache
def evaluated(stack: str) -> Evaluation:
    return evaluate(stack)


def env_of(container: Registration) -> dict[str, str]:
    return dict(item.split("=", 1) for item in plain(container.inputs.get("envs", [])))


def uploads_of(container: Registration) -> dict[str, dict[str, Any]]:
    return {u["file"]: u for u in plain(container.inputs.get("uploads", []))}


def networks_of(container: Registration) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in plain(container.inputs.get("networksAdvanced", []))}


def mounts_of(container: Registration) -> dict[str, dict[str, Any]]:
    return {m["target"]: m for m in plain(container.inputs.get("mounts", []))}


def labels_of(container: Registration) -> dict[str, str]:
    return {item["label"]: item["value"] for item in container.inputs["labels"]}


@pytest.mark.parametrize("stack", STACKS)
def test_counts_and_docker_names(stack: str) -> None:
    ev = evaluated(stack)
    s = parse(stack, stack_config(stack))
    names = set(ev.containers)
    prefix = f"transvidio-{stack}-"
    expected = {"postgres-primary", "postgres-credentials", "redis-backup", "nginx", "mpi-master"}
    expected |= {f"postgres-replica-{i}" for i in range(1, s.postgres.replica_count + 1)}
    expected |= {f"etcd-{i}" for i in range(1, s.postgres.consensus_nodes + 1)}
    expected |= {f"redis-{i}" for i in range(s.redis.replica_count + 1)}
    expected |= {f"sentinel-{i}" for i in range(1, s.redis.sentinel_count + 1)}
    expected |= {f"mpi-worker-{i}" for i in range(1, s.mpi.worker_count + 1)}
    expected |= {f"backend-{i}" for i in range(1, s.backend.replica_count + 1)}
    assert names == {prefix + n for n in expected}
    docker_named = ev.of_type("docker:index/network:Network") + ev.of_type("docker:index/volume:Volume")
    assert all(r.inputs["name"].startswith(prefix) for r in docker_named)
    assert all(r.inputs["imageName"].startswith(prefix) for r in ev.of_type("docker:index/image:Image"))


@pytest.mark.parametrize("stack", STACKS)
def test_components_have_typed_tokens_and_parent_their_children(stack: str) -> None:
    ev = evaluated(stack)
    components = {r.name: r.type for r in ev.registrations if r.type.startswith("transvidio:")}
    assert components == {
        "secrets": "transvidio:secrets:ClusterSecrets",
        "network": "transvidio:network:ClusterNetworks",
        "postgres": "transvidio:postgres:PostgresReplicaSet",
        "redis": "transvidio:redis:RedisSentinelGroup",
        "mpi": "transvidio:mpi:MpiCluster",
        "backend": "transvidio:backend:BackendPool",
        "nginx": "transvidio:nginx:NginxLB",
    }
    assert_children_parented(ev)


@pytest.mark.parametrize("stack", STACKS)
def test_every_container_gets_the_hygiene(stack: str) -> None:
    for name, container in evaluated(stack).containers.items():
        i = container.inputs
        assert i["restart"] == "unless-stopped", name
        assert i["logDriver"] == "json-file" and i["logOpts"] == {"max-file": "3", "max-size": "10m"}, name
        assert i["memory"] >= 32, name
        assert i["securityOpts"] == ["no-new-privileges:true"], name
        assert i["capabilities"]["drops"] == ["ALL"], name
        assert i["healthcheck"]["tests"][0] == "CMD" and len(i["healthcheck"]["tests"]) > 1, name
        assert i["image"].startswith("sha256:"), name
        labels = labels_of(container)
        assert labels["io.transvidio.project"] == "transvidio"
        assert labels["io.transvidio.stack"] == stack
        assert labels["io.transvidio.component"] in {"postgres", "redis", "mpi", "backend", "nginx"}
        assert labels["io.transvidio.role"]
        if labels["io.transvidio.role"] == "postgres-credentials":  # no network at all
            assert (i["networkMode"], i.get("networksAdvanced")) == ("none", None), name
        else:
            assert i["hostname"] in {alias for n in networks_of(container).values() for alias in n["aliases"]}
            assert "networkMode" not in i, name
        assert container.options["delete_before_replace"] is True, name
        assert container.options["replace_on_changes"] == ["healthcheck"], name
        role = labels["io.transvidio.role"]
        health = i["healthcheck"]
        start = {"postgres-primary": "2m0s", "postgres-replica": "2m0s"}.get(role, "30s")
        # Only what others wait for blocks the apply until healthy, and is checked every 5 s;
        # the rest every 30 s (each check is an exec: CPU the MPI ranks cannot have).
        waited = role in ("postgres-primary", "postgres-credentials") or name.endswith("-redis-0")
        assert bool(i.get("wait")) == waited, name
        assert (health["interval"], health["timeout"], health["retries"], health["startPeriod"]) == (
            ("5s", "4s", 5, start) if waited else ("30s", "4s", 2, start)
        ), name
        # Only PostgreSQL gets /dev/shm.
        assert ("shmSize" in i) == (role in ("postgres-primary", "postgres-replica")), name


def test_only_nginx_publishes_in_prod_and_the_data_tier_is_internal_only() -> None:
    ev = evaluated("prod")
    publishing = {name for name, c in ev.containers.items() if c.inputs.get("ports")}
    assert publishing == {"transvidio-prod-nginx"}
    nginx_ports = plain(ev.containers["transvidio-prod-nginx"].inputs["ports"])
    assert nginx_ports == [{"internal": 8080, "external": 80, "ip": "0.0.0.0", "protocol": "tcp"}]
    networks = {r.inputs["name"]: r.inputs for r in ev.of_type("docker:index/network:Network")}
    assert networks["transvidio-prod-data"]["internal"] is True
    assert networks["transvidio-prod-edge"]["internal"] is False
    for name, container in ev.containers.items():
        attached = set(networks_of(container))
        role = labels_of(container)["io.transvidio.role"]
        if role in {
            "postgres-primary",
            "postgres-replica",
            "etcd",
            "redis",
            "redis-backup",
            "sentinel",
            "mpi-master",
            "mpi-worker",
        }:
            assert attached == {"transvidio-prod-data"}, name
        elif role == "backend":
            assert attached == {"transvidio-prod-data", "transvidio-prod-edge"}, name
        elif role == "postgres-credentials":
            assert attached == set(), name
        else:
            assert attached == {"transvidio-prod-edge"}, name


def test_dev_publishes_debug_ports_on_loopback_after_the_seed_port_map() -> None:
    ev = evaluated("dev")
    published = {
        name.removeprefix("transvidio-dev-"): [
            (p["ip"], p["external"], p["internal"]) for p in plain(c.inputs["ports"])
        ]
        for name, c in ev.containers.items()
        if c.inputs.get("ports")
    }
    assert published == {
        "postgres-primary": [("127.0.0.1", 5432, 5432)],
        "postgres-replica-1": [("127.0.0.1", 5433, 5432)],
        "redis-0": [("127.0.0.1", 6379, 6379)],
        "redis-1": [("127.0.0.1", 6380, 6379)],
        "sentinel-1": [("127.0.0.1", 26379, 26379)],
        "nginx": [("127.0.0.1", 8080, 8080)],
    }


@pytest.mark.parametrize("stack", STACKS)
def test_fixed_addresses_match_the_topology(stack: str) -> None:
    ev = evaluated(stack)
    topo = Topology(parse(stack, stack_config(stack)))
    nodes = topo.all_nodes
    assert {n.container_name for n in nodes} == set(ev.containers)
    for node in nodes:
        networks = networks_of(ev.containers[node.container_name])
        if node.data_ip:
            assert networks[f"transvidio-{stack}-data"]["ipv4Address"] == node.data_ip
        if node.edge_ip:
            assert networks[f"transvidio-{stack}-edge"]["ipv4Address"] == node.edge_ip
    addresses = [n.data_ip for n in nodes if n.data_ip] + [n.edge_ip for n in nodes if n.edge_ip]
    assert len(addresses) == len(set(addresses))


def test_the_address_plan_of_prod_is_the_documented_one() -> None:
    topo = Topology(parse("prod", stack_config("prod")))
    plan = {n.hostname: (n.data_ip, n.edge_ip) for n in topo.all_nodes}
    data, edge = "10.211.1.", "10.211.0."
    assert plan == {
        "postgres-primary": (data + "10", None),
        "postgres-replica-1": (data + "11", None),
        "postgres-replica-2": (data + "12", None),
        "postgres-credentials": (None, None),
        "etcd-1": (data + "60", None),
        "etcd-2": (data + "61", None),
        "etcd-3": (data + "62", None),
        "redis-0": (data + "20", None),
        "redis-1": (data + "21", None),
        "redis-2": (data + "22", None),
        "redis-backup": (data + "29", None),
        "sentinel-1": (data + "30", None),
        "sentinel-2": (data + "31", None),
        "sentinel-3": (data + "32", None),
        "mpi-master": (data + "40", None),
        "mpi-worker-1": (data + "41", None),
        "mpi-worker-2": (data + "42", None),
        "backend-1": (data + "100", edge + "100"),
        "backend-2": (data + "101", edge + "101"),
        "backend-3": (data + "102", edge + "102"),
        "nginx": (None, edge + "90"),
    }


@pytest.mark.parametrize("stack", STACKS)
def test_backend_env_contract(stack: str) -> None:
    ev = evaluated(stack)
    s = parse(stack, stack_config(stack))
    for backend in (c for c in ev.containers.values() if labels_of(c)["io.transvidio.role"] == "backend"):
        env = env_of(backend)
        # Every node in both: libpq finds the primary, the lag watch finds the standbys.
        nodes = ["postgres-primary", *(f"postgres-replica-{i}" for i in range(1, s.postgres.replica_count + 1))]
        assert env["POSTGRES_MASTER_HOST"].split(",") == nodes
        assert env["POSTGRES_SLAVE_HOSTS"].split(",") == nodes
        assert env["POSTGRES_DB"] == "transvidio" and env["POSTGRES_USER"] == "transvidio"
        assert env["REDIS_SENTINELS"].split(",") == [
            f"{s.network.data_subnet.network_address + 30 + i}:26379" for i in range(s.redis.sentinel_count)
        ]
        assert env["REDIS_MASTER_NAME"] == "transvidio"
        assert env["MPI_MASTER_HOST"] == "mpi-master" and env["MPI_SSH_PORT"] == "22"
        assert env["OUTPUTS_DIR"] == render.OUTPUTS_DIR
        assert env["POSTGRES_PASSWORD_FILE"] == f"{render.SECRETS_DIR}/app-db-password"
        assert env["REDIS_PASSWORD_FILE"] == f"{render.SECRETS_DIR}/redis-password"
        assert env["SECRET_KEY_FILE"] == f"{render.SECRETS_DIR}/secret-key"
        assert not is_secret(backend.inputs["envs"])  # names and paths only
        assert is_secret(backend.inputs["uploads"])
        pinned = {h["host"]: h["ip"] for h in backend.inputs["hosts"]}
        topo = Topology(s)
        assert pinned == {n.hostname: n.data_ip for n in [*topo.postgres_nodes, topo.mpi_master]}
        mounts = mounts_of(backend)
        assert set(mounts) == {render.UPLOADS_DIR, render.OUTPUTS_DIR}
        assert not any(m.get("readOnly") for m in mounts.values())
        assert backend.inputs["healthcheck"]["tests"] == ["CMD", "python3", "/usr/local/bin/healthcheck.py"]


@pytest.mark.parametrize("stack", STACKS)
def test_postgres_first_node_waits_for_etcd_and_the_others_follow_it(stack: str) -> None:
    ev = evaluated(stack)
    s = parse(stack, stack_config(stack))
    containers = ev.containers
    first = containers[f"transvidio-{stack}-postgres-primary"]
    assert first.inputs["wait"] is True
    etcd = [c for c in containers.values() if labels_of(c)["io.transvidio.role"] == "etcd"]
    assert len(etcd) == s.postgres.consensus_nodes
    # A member is healthy only once a majority is up: none is waited for alone.
    assert not any(member.inputs.get("wait") for member in etcd)
    assert {member.urn for member in etcd} <= set(first.options["dependencies"])
    writer = containers[f"transvidio-{stack}-postgres-credentials"]
    replicas = [c for c in containers.values() if labels_of(c)["io.transvidio.role"] == "postgres-replica"]
    assert replicas
    # Registration order is dependency order: no replica registers before the first node returned.
    order = [r.name for r in ev.registrations]
    nodes = [first, *replicas]
    for replica in replicas:
        assert order.index(replica.name) > order.index(first.name)
        assert primary_urn_in(first, replica) and writer.urn in replica.options["dependencies"]
    assert writer.urn in first.options["dependencies"]
    for node in nodes:
        name = node.inputs["hostname"]
        assert env_of(node)["PG_ROLE"] == "node" and env_of(node)["PG_NODE"] == name
        assert node.inputs["shmSize"] >= 64
        assert node.inputs["healthcheck"]["tests"] == ["CMD", "/usr/local/bin/healthcheck.sh"]
        files = uploads_of(node)
        # Any node may become primary: each has the setup, the backups' config and its own Patroni config.
        assert f"{render.POSTGRES_CONF_DIR}/primary-setup.sql" in files and render.PGBACKREST_CONF in files
        assert files[f"{render.POSTGRES_CONF_DIR}/{name}.patroni.yml"]["content"] == render.patroni_yml(
            s, next(n for n in Topology(s).postgres_nodes if n.hostname == name)
        )
        # Its own data volume, the shared backup repository and the credentials store (read-only).
        assert {m["target"]: (m["source"], bool(m.get("readOnly"))) for m in mounts_of(node).values()} == {
            "/var/lib/postgresql/data": (f"transvidio-{stack}-{name}-data", False),
            render.PGBACKREST_REPO_DIR: (f"transvidio-{stack}-postgres-backups", False),
            render.SECRETS_DIR: (f"transvidio-{stack}-postgres-credentials", True),
        }
    # The writer: the store's volume, its files in the inbox, and no network.
    assert {m["target"]: m["source"] for m in mounts_of(writer).values()} == {
        "/srv/credentials": f"transvidio-{stack}-postgres-credentials"
    }
    assert writer.inputs["entrypoints"] == ["/usr/local/bin/credentials.sh", "serve"]
    assert writer.inputs["healthcheck"]["tests"] == ["CMD", "/usr/local/bin/credentials.sh", "check"]
    assert not writer.inputs.get("ports") and "envs" not in writer.inputs
    for member in etcd:
        name = member.inputs["hostname"]
        assert env_of(member) == {"PG_ROLE": "etcd", "PG_NODE": name}
        assert {m["target"]: m["source"] for m in mounts_of(member).values()} == {
            "/var/lib/etcd": f"transvidio-{stack}-{name}-data"
        }
        assert set(uploads_of(member)) == {f"{render.POSTGRES_CONF_DIR}/{name}.etcd.yml"}


def primary_urn_in(first: Registration, replica: Registration) -> bool:
    return first.urn in replica.options["dependencies"]


@pytest.mark.parametrize("stack", STACKS)
def test_redis_nodes_and_sentinels(stack: str) -> None:
    ev = evaluated(stack)
    s = parse(stack, stack_config(stack))
    nodes = [c for c in ev.containers.values() if labels_of(c)["io.transvidio.role"] == "redis"]
    sentinels = [c for c in ev.containers.values() if labels_of(c)["io.transvidio.role"] == "sentinel"]
    assert len(nodes) == s.redis.replica_count + 1 and len(sentinels) == s.redis.sentinel_count
    master = ev.containers[f"transvidio-{stack}-redis-0"]
    assert master.inputs["wait"] is True
    for node in nodes:
        env = env_of(node)
        assert env["INITIAL_MASTER"] == str(s.network.data_subnet.network_address + 20)
        assert env["REDIS_NODE"] == node.inputs["hostname"]
        # The entrypoint announces its address on this network: the container's own.
        assert env["DATA_SUBNET"] == str(s.network.data_subnet)
        assert (
            ipaddress.ip_address(networks_of(node)[f"transvidio-{stack}-data"]["ipv4Address"]) in s.network.data_subnet
        )
        conf = uploads_of(node)[f"{render.REDIS_CONF_DIR}/{node.inputs['hostname']}.conf"]["content"]
        assert "appendonly yes" in conf
        for secret in (render.REDIS_ACL_FILE, redis.NODE_PASSWORD_FILE):
            upload = uploads_of(node)[secret]
            assert (upload["permissions"], upload["owner"]) == ("0400", "10002")
        assert uploads_of(node)[render.REDIS_ACL_FILE]["content"] == render.redis_acl(
            render.REDIS_NODE_ACL, redis_passwords(ev)
        )
        assert uploads_of(node)[redis.NODE_PASSWORD_FILE]["content"] == redis_passwords(ev)["replica"]
    for sentinel in sentinels:
        assert sentinel.inputs["entrypoints"] == ["/usr/local/bin/redis-sentinel.sh"]
        conf = uploads_of(sentinel)[f"{render.REDIS_CONF_DIR}/{sentinel.inputs['hostname']}.conf"]["content"]
        assert f"sentinel monitor transvidio {s.network.data_subnet.network_address + 20} 6379 {s.redis.quorum}" in conf
        assert set(mounts_of(sentinel)) == {"/data"}
        assert env_of(sentinel)["DATA_SUBNET"] == str(s.network.data_subnet)
        assert uploads_of(sentinel)[render.SENTINEL_ACL_FILE]["content"] == render.redis_acl(
            render.SENTINEL_ACL, redis_passwords(ev)
        )
        assert uploads_of(sentinel)[redis.SENTINEL_PASSWORD_FILE]["content"] == redis_passwords(ev)["sentinel"]


def redis_passwords(ev: Evaluation) -> dict[str, str]:
    generated = {r.name: plain(r.outputs["result"]) for r in ev.of_type("random:index/randomPassword:RandomPassword")}
    return {
        "app": generated["secrets-redis"],
        "replica": generated["secrets-redis-replication"],
        "sentinel": generated["secrets-redis-sentinel"],
        "admin": generated["secrets-redis-admin"],
    }


@pytest.mark.parametrize("stack", STACKS)
def test_mpi_keys_hostfile_and_known_hosts(stack: str) -> None:
    ev = evaluated(stack)
    s = parse(stack, stack_config(stack))
    keys = {r.name: r for r in ev.of_type("tls:index/privateKey:PrivateKey")}
    assert all(k.inputs["algorithm"] == "ED25519" for k in keys.values())
    assert len(keys) == 1 + 1 + s.mpi.worker_count  # client key + one host key per node
    mpi_nodes = [c for c in ev.containers.values() if labels_of(c)["io.transvidio.component"] == "mpi"]
    assert len(mpi_nodes) == 1 + s.mpi.worker_count
    topo = Topology(s)
    for node in mpi_nodes:
        uploads = uploads_of(node)
        hostname = node.inputs["hostname"]
        master = hostname == "mpi-master"
        pinned = {h["host"]: h["ip"] for h in node.inputs["hosts"]}
        runner = [*topo.postgres_nodes] if master else []
        assert pinned == {n.hostname: n.data_ip for n in [*topo.mpi_nodes, *runner]}
        own_key = keys[f"{hostname}-host-key"]
        assert uploads["/etc/ssh/ssh_host_ed25519_key"]["owner"] == "0"
        assert uploads["/etc/ssh/ssh_host_ed25519_key"]["permissions"] == "0400"
        assert uploads["/etc/ssh/ssh_host_ed25519_key"]["content"] == plain(own_key.outputs["private_key_openssh"])
        assert (
            "btl_tcp_if_include = " + str(s.network.data_subnet)
            in uploads["/home/app/.openmpi/mca-params.conf"]["content"]
        )
        assert "plm_ssh_no_tree_spawn = 1" in uploads["/home/app/.prte/mca-params.conf"]["content"]
        client_files = {"/home/app/.ssh/id_ed25519", "/etc/ssh/ssh_known_hosts", f"{render.MPI_CONF_DIR}/hostfile"}
        if not master:  # a worker launches nothing: it only admits the master
            assert not client_files & set(uploads), hostname
            public = keys["mpi-client-key"].outputs["public_key_openssh"].strip()
            assert uploads["/home/app/.ssh/authorized_keys"]["content"] == (
                f'restrict,from="{topo.mpi_master.data_ip}" {public}\n'
            )
            continue
        assert "/home/app/.ssh/authorized_keys" not in uploads  # nobody logs into the master
        assert uploads[f"{render.MPI_CONF_DIR}/hostfile"]["content"] == render.hostfile(s)
        assert uploads["/home/app/.ssh/id_ed25519"]["owner"] == "10010"
        known = uploads["/etc/ssh/ssh_known_hosts"]["content"].splitlines()
        assert len(known) == len(mpi_nodes)
        for line in known:
            host = line.split(",")[0]
            host_key = keys[f"mpi-{host}-host-key" if not host.startswith("mpi-") else f"{host}-host-key"]
            assert line.endswith(host_key.outputs["public_key_openssh"].strip())


def scaling_diff(overrides: dict[str, Any]) -> tuple[set[str], set[str], set[str]]:
    """Resource names added, removed and changed when prod is evaluated again with `overrides`."""
    before = {r.urn: plain(r.inputs) for r in evaluated("prod").registrations}
    after = {r.urn: plain(r.inputs) for r in evaluate("prod", overrides).registrations}
    names = lambda urns: {urn.rsplit("::", 1)[1] for urn in urns}  # noqa: E731
    changed = {urn for urn in before if urn in after and before[urn] != after[urn]}
    return names(set(after) - set(before)), names(set(before) - set(after)), names(changed)


def test_scaling_backends_adds_backends_and_changes_nothing_else() -> None:
    # nginx finds the pool by its alias: its config and container stay as they are.
    assert scaling_diff({"backend": {"replicas": 5}}) == ({"backend-4", "backend-5"}, set(), set())
    five = evaluate("prod", {"backend": {"replicas": 5}})
    for number in (4, 5):
        backend = five.containers[f"transvidio-prod-backend-{number}"]
        assert render.BACKENDS_ALIAS in networks_of(backend)["transvidio-prod-edge"]["aliases"]
        assert render.BACKENDS_ALIAS not in networks_of(backend)["transvidio-prod-data"]["aliases"]


def test_scaling_postgres_replicas_never_touches_the_primary() -> None:
    added, removed, changed = scaling_diff({"postgres": {"replicas": 1}})
    assert (added, removed) == (set(), {"postgres-replica-2", "postgres-replica-2-data"})
    # Only the clients change: they list every node (their env and /etc/hosts). The job
    # runner's replacement costs no job: its lease expires and the job is claimed again.
    assert changed == {"backend-1", "backend-2", "backend-3", "mpi-master"}


@pytest.mark.parametrize("stack", STACKS)
def test_every_duration_is_in_the_form_the_provider_reads_back(stack: str) -> None:
    from tests.e2e.provider import go_duration, parse_duration

    durations = [
        (name, key, value)
        for name, container in evaluated(stack).containers.items()
        for key, value in container.inputs["healthcheck"].items()
        if key != "tests" and isinstance(value, str)
    ]
    assert {key for _, key, _ in durations} == {"interval", "timeout", "startPeriod"}
    for name, key, value in durations:
        assert value == go_duration(parse_duration(value)), (name, key, value)


@pytest.mark.parametrize("stack", STACKS)
def test_memory_swap_equals_memory_and_stops_are_graceful(stack: str) -> None:
    for name, container in evaluated(stack).containers.items():
        assert container.inputs["memorySwap"] == container.inputs["memory"], name
        grace = container.inputs["destroyGraceSeconds"]
        role = labels_of(container)["io.transvidio.role"]
        nodes = ("postgres-primary", "postgres-replica")
        assert grace == (60 if role in nodes else 30 if role in ("redis", "sentinel") else 10), name


@pytest.mark.parametrize("stack", STACKS)
def test_read_only_mounts_never_copy_their_image_into_a_shared_volume(stack: str) -> None:
    nginx = evaluated(stack).containers[f"transvidio-{stack}-nginx"]
    assert mounts_of(nginx)[render.OUTPUTS_DIR] == {
        "target": render.OUTPUTS_DIR,
        "source": f"transvidio-{stack}-outputs",
        "type": "volume",
        "readOnly": True,
        "volumeOptions": {"noCopy": True},
    }
    for name, container in evaluated(stack).containers.items():
        for mount in mounts_of(container).values():
            assert bool(mount.get("readOnly")) == bool(mount.get("volumeOptions", {}).get("noCopy")), name


def test_networks_are_bridges_replaced_delete_first() -> None:
    for network in evaluated("prod").of_type("docker:index/network:Network"):
        assert network.options["delete_before_replace"] is True
        assert network.inputs["driver"] == "bridge"
        assert "options" not in network.inputs


@pytest.mark.parametrize("stack", STACKS)
def test_no_secret_appears_outside_a_secret(stack: str) -> None:
    ev = evaluated(stack)
    secret_values = {plain(r.outputs["result"]) for r in ev.of_type("random:index/randomPassword:RandomPassword")} | {
        plain(r.outputs["private_key_openssh"]) for r in ev.of_type("tls:index/privateKey:PrivateKey")
    }
    tokens = set(parse(stack, stack_config(stack)).backend.api_tokens)
    assert len(secret_values) == len(GENERATED) + len(tokens) + len(ev.of_type("tls:index/privateKey:PrivateKey"))
    # Known to the containers by their hashes only: the API tokens and the Redis admin's password.
    hashed_only = {plain(r.outputs["result"]) for r in ev.of_type("random:index/randomPassword:RandomPassword")
                   if r.name.startswith("secrets-api-token-") or r.name == "secrets-redis-admin"}  # fmt: skip
    assert len(hashed_only) == len(tokens) + 1

    def leaks(value: Any) -> list[str]:
        if is_secret(value):
            return []
        if isinstance(value, dict):
            return [leak for v in value.values() for leak in leaks(v)]
        if isinstance(value, list):
            return [leak for v in value for leak in leaks(v)]
        return [s for s in secret_values if isinstance(value, str) and s in value]

    for registration in ev.registrations:
        assert leaks(registration.inputs) == [], registration.name
    found_in_secret = json.dumps(plain([r.inputs for r in ev.registrations]))
    assert all(s in found_in_secret for s in secret_values - hashed_only)  # they do reach the containers
    assert not any(s in found_in_secret for s in hashed_only)
    assert all(hashlib.sha256(s.encode()).hexdigest() in found_in_secret for s in hashed_only)
    for name, (value, secret) in ev.exports.items():
        if any(s in json.dumps(value) for s in secret_values):
            assert secret, f"export {name} leaks a secret"
    for name in (
        "postgresPrimaryDsn",
        "postgresStandbyDsn",
        "postgresSuperuserPassword",
        "redisPassword",
        "redisAdminPassword",
        "secretKey",
        "apiTokens",
    ):
        assert ev.exports[name][1], name


def test_secret_config_replaces_a_generated_password() -> None:
    ev = evaluate("dev", secret_config={"redisPassword": "chosen-by-the-operator"})
    node = ev.containers["transvidio-dev-redis-0"]
    acl = uploads_of(node)[render.REDIS_ACL_FILE]["content"]
    assert f"user app on #{hashlib.sha256(b'chosen-by-the-operator').hexdigest()} " in acl
    assert is_secret(node.inputs["uploads"])
    backend = uploads_of(ev.containers["transvidio-dev-backend-1"])
    assert backend[f"{render.SECRETS_DIR}/redis-password"]["content"] == "chosen-by-the-operator"
    assert ev.exports["redisPassword"] == ("chosen-by-the-operator", True)


def test_each_secret_is_generated_by_a_password_resource_of_a_stable_name_and_length() -> None:
    # Renaming one would make `pulumi up` generate a new password: a rotation nobody asked for.
    passwords = evaluated("prod").of_type("random:index/randomPassword:RandomPassword")
    assert {r.name: r.inputs["length"] for r in passwords} == {
        "secrets-postgres-superuser": 32,
        "secrets-postgres-replication": 32,
        "secrets-postgres-rewind": 32,
        "secrets-patroni-api": 32,
        "secrets-postgres-app": 32,
        "secrets-redis": 32,
        "secrets-redis-replication": 32,
        "secrets-redis-sentinel": 32,
        "secrets-redis-admin": 32,
        "secrets-secret-key": 48,
        "secrets-api-token-default": 40,
    }


def test_each_api_token_name_gets_its_own_token_and_renaming_one_keeps_the_others() -> None:
    two = evaluate("prod", {"backend": {"apiTokens": ["ci", "alice"]}})
    tokens = {r.name: plain(r.outputs["result"]) for r in two.of_type("random:index/randomPassword:RandomPassword")}
    assert {name for name in tokens if name.startswith("secrets-api-token-")} == {
        "secrets-api-token-ci",
        "secrets-api-token-alice",
    }
    assert two.exports["apiTokens"] == (
        {"ci": tokens["secrets-api-token-ci"], "alice": tokens["secrets-api-token-alice"]},
        True,
    )
    # Every backend holds the tokens' hashes, never a token.
    for number in (1, 2, 3):
        upload = uploads_of(two.containers[f"transvidio-prod-backend-{number}"])[f"{render.SECRETS_DIR}/api-tokens"]
        assert upload["content"] == render.api_tokens_file(
            {"ci": tokens["secrets-api-token-ci"], "alice": tokens["secrets-api-token-alice"]}
        )
        assert (upload["permissions"], upload["owner"]) == ("0400", "10010")
    # Rotating "ci" (renamed) leaves "alice" as it was: its resource keeps its name.
    rotated = evaluate("prod", {"backend": {"apiTokens": ["ci-2", "alice"]}})
    names = {r.name for r in rotated.of_type("random:index/randomPassword:RandomPassword")}
    assert {"secrets-api-token-ci-2", "secrets-api-token-alice"} <= names and "secrets-api-token-ci" not in names


def test_passwords_are_url_safe_and_stable() -> None:
    for password in evaluated("prod").of_type("random:index/randomPassword:RandomPassword"):
        assert password.inputs["special"] is False
        assert password.inputs["length"] >= 32
        assert "keepers" not in password.inputs


@pytest.mark.parametrize("stack", STACKS)
def test_evaluating_twice_gives_identical_inputs(stack: str) -> None:
    first, second = evaluate(stack), evaluate(stack)
    assert [(r.urn, plain(r.inputs)) for r in first.registrations] == [
        (r.urn, plain(r.inputs)) for r in second.registrations
    ] or sorted((r.urn, json.dumps(plain(r.inputs), sort_keys=True)) for r in first.registrations) == sorted(
        (r.urn, json.dumps(plain(r.inputs), sort_keys=True)) for r in second.registrations
    )
    assert first.exports == second.exports


@pytest.mark.parametrize("stack", STACKS)
def test_data_volumes_survive_destroy(stack: str) -> None:
    ev = evaluated(stack)
    volumes = ev.of_type("docker:index/volume:Volume")
    assert volumes
    # Every volume but the credentials store outlives `pulumi destroy`: secrets do not.
    store = f"transvidio-{stack}-postgres-credentials"
    assert {v.inputs["name"] for v in volumes if not v.options["retain_on_delete"]} == {store}
    names = {v.inputs["name"] for v in volumes}
    mounted = {m["source"] for c in ev.containers.values() for m in mounts_of(c).values()}
    assert mounted == names  # every container volume is declared, and every one is used
    for volume in volumes:
        labels = {item["label"]: item["value"] for item in volume.inputs["labels"]}
        component = volume.name.split("-")[0]  # resource names start with their component's
        assert labels == {
            "io.transvidio.project": "transvidio",
            "io.transvidio.stack": stack,
            "io.transvidio.component": component,
        }, volume.name


def test_images_build_from_images_dir_on_the_configured_base() -> None:
    ev = evaluate("prod", {"images": {"base": "debian:forky-slim"}})
    images = {r.name: r.inputs for r in ev.of_type("docker:index/image:Image")}
    assert set(images) == {f"{role}-image" for role in ("postgres", "redis", "mpi", "backend", "nginx")}
    for name, inputs in images.items():
        role = name.removesuffix("-image")
        assert inputs["build"]["context"] == ("images" if role in ("backend", "mpi") else f"images/{role}")
        assert inputs["build"]["dockerfile"] == f"images/{role}/Dockerfile"
        assert inputs["build"]["args"]["BASE_IMAGE"] == "debian:forky-slim"
        assert inputs["skipPush"] is True


def test_a_users_backend_image_replaces_the_build() -> None:
    ev = evaluate("prod", {"images": {"backend": "registry.example.com/team/backend:1.4"}})
    assert "backend-image" not in {r.name for r in ev.of_type("docker:index/image:Image")}
    remote = ev.named("backend-image")
    assert remote.type == "docker:index/remoteImage:RemoteImage"
    assert remote.inputs["name"] == "registry.example.com/team/backend:1.4"
    assert ev.containers["transvidio-prod-backend-1"].inputs["image"] == remote.outputs["image_id"]


def container_dependencies(ev: Evaluation) -> dict[str, set[str]]:
    """Container -> the containers it depends on (depends_on and Output inputs), by resource name."""
    names = {r.urn: r.name for r in ev.of_type("docker:index/container:Container")}
    return {
        r.name: {names[urn] for urn in r.options["dependencies"] if urn in names}
        for r in ev.of_type("docker:index/container:Container")
    }


def test_every_dependency_edge_between_containers_is_exactly_the_designed_one() -> None:
    backends = {"backend-1", "backend-2", "backend-3"}
    expected = {
        "postgres-etcd-1": set(),
        "postgres-etcd-2": set(),
        "postgres-etcd-3": set(),
        "postgres-primary": {"postgres-etcd-1", "postgres-etcd-2", "postgres-etcd-3", "postgres-credentials"},
        "postgres-credentials": set(),
        "postgres-replica-1": {"postgres-primary", "postgres-credentials"},
        "postgres-replica-2": {"postgres-primary", "postgres-credentials"},
        "redis-0": set(),
        "redis-1": {"redis-0"},
        "redis-2": {"redis-0"},
        "redis-backup": {"redis-0"},
        # Not after the master: a master with data waits for a Sentinel before it starts.
        "redis-sentinel-1": set(),
        "redis-sentinel-2": set(),
        "redis-sentinel-3": set(),
        **{key: {"postgres-primary", "redis-0"} for key in backends},
        "mpi-master": set(),
        "mpi-worker-1": set(),
        "mpi-worker-2": set(),
        "nginx": backends,
    }
    assert container_dependencies(evaluated("prod")) == expected


# Any PostgreSQL node may become primary and then applies every role's password.
POSTGRES_NODE_SECRETS = {
    "postgres-password",
    "replication-password",
    "rewind-password",
    "patroni-api-password",
    "app-db-password",
}
SECRET_FILES = {
    # The nodes read theirs from the credentials store; only its writer has them as uploads.
    "postgres-primary": set(),
    "postgres-replica": set(),
    "postgres-credentials": POSTGRES_NODE_SECRETS,
    "etcd": set(),
    "redis": {"redis-users.acl", "redis-replication-password"},
    "sentinel": {"sentinel-users.acl", "redis-sentinel-password"},
    "redis-backup": {"redis-replication-password"},
    "mpi-master": {"ssh_host_ed25519_key", "id_ed25519", "app-db-password"},
    "mpi-worker": {"ssh_host_ed25519_key"},
    "backend": {"api-tokens", "app-db-password", "redis-password", "secret-key"},
    "nginx": set(),
}


@pytest.mark.parametrize("stack", STACKS)
def test_each_container_gets_exactly_its_secrets_and_the_right_ones(stack: str) -> None:
    ev = evaluated(stack)
    generated = {r.name: plain(r.outputs["result"]) for r in ev.of_type("random:index/randomPassword:RandomPassword")}
    by_file = {
        "postgres-password": generated["secrets-postgres-superuser"],
        "replication-password": generated["secrets-postgres-replication"],
        "rewind-password": generated["secrets-postgres-rewind"],
        "patroni-api-password": generated["secrets-patroni-api"],
        "app-db-password": generated["secrets-postgres-app"],
        "redis-password": generated["secrets-redis"],
        "redis-replication-password": generated["secrets-redis-replication"],
        "redis-sentinel-password": generated["secrets-redis-sentinel"],
        "secret-key": generated["secrets-secret-key"],
        "api-tokens": render.api_tokens_file({"default": generated["secrets-api-token-default"]}),
        "redis-users.acl": render.redis_acl(render.REDIS_NODE_ACL, redis_passwords(ev)),
        "sentinel-users.acl": render.redis_acl(render.SENTINEL_ACL, redis_passwords(ev)),
    }
    checked = set()
    for name, container in ev.containers.items():
        role = labels_of(container)["io.transvidio.role"]
        secret_uploads = {
            path.rsplit("/", 1)[-1]: u for path, u in uploads_of(container).items() if u["permissions"] == "0400"
        }
        assert set(secret_uploads) == SECRET_FILES[role], name
        if role == "backend":  # readable by the backend's user only: the reference image runs as it
            assert {u["owner"] for u in secret_uploads.values()} == {str(SERVICE_UIDS["backend"])}, name
        for file, upload in secret_uploads.items():
            if file in by_file:
                assert upload["content"] == by_file[file], (name, file)
                checked.add(file)
    assert checked == set(by_file)
    # No secret in any environment: a value there shows in `docker inspect` and reaches every child.
    for name, container in ev.containers.items():
        assert not is_secret(container.inputs.get("envs", [])), name
        env = env_of(container)
        assert not any(secret in value for value in env.values() for secret in generated.values()), name


def test_durations_are_written_as_go_prints_them() -> None:
    from components.container import duration

    assert [duration(s) for s in (0, 5, 59, 60, 90, 3600, 3725)] == [
        "0s",
        "5s",
        "59s",
        "1m0s",
        "1m30s",
        "1h0m0s",
        "1h2m5s",
    ]
    with pytest.raises(ValueError, match="negative duration -1"):
        duration(-1)


def test_service_uids_match_the_images_and_the_writers_of_shared_volumes_agree() -> None:
    import re

    from components.container import SERVICE_UIDS
    from tests.program import PROJECT_DIR

    for role, uid in SERVICE_UIDS.items():
        dockerfile = (PROJECT_DIR / "images" / role / "Dockerfile").read_text()
        declared = re.search(r"^ARG SERVICE_UID=(\d+)$", dockerfile, re.MULTILINE)
        if declared:  # the image's own default is the uid the stack uploads secrets for
            assert int(declared.group(1)) == uid, role
            assert '--uid "${SERVICE_UID}"' in dockerfile, role
        else:  # an image with a fixed user (nginx: Debian's www-data)
            assert f"\nUSER {uid}:{uid}\n" in dockerfile, role
    # The backends and the MPI nodes write the shared uploads and outputs volumes: one owner.
    assert SERVICE_UIDS["backend"] == SERVICE_UIDS["mpi"]
    args = {
        r.name: r.inputs["build"]["args"]["SERVICE_UID"] for r in evaluated("prod").of_type("docker:index/image:Image")
    }
    assert args == {f"{role}-image": str(uid) for role, uid in SERVICE_UIDS.items()}


def test_prod_exports_exactly_these_outputs() -> None:
    ev = evaluated("prod")
    plain_exports = {name: plain(value) for name, (value, secret) in ev.exports.items() if not secret}
    assert plain_exports == {
        "url": "http://localhost:80",
        "endpoints": {
            "nginx": "http://localhost:80",
            "postgresNodes": ["postgres-primary:5432", "postgres-replica-1:5432", "postgres-replica-2:5432"],
            "redisSentinels": "10.211.1.30:26379,10.211.1.31:26379,10.211.1.32:26379",
            "redisMasterName": "transvidio",
            "mpiMaster": "mpi-master",
            "backends": ["backend-1", "backend-2", "backend-3"],
        },
        "counts": {"backends": 3, "postgresReplicas": 2, "redisReplicas": 2, "sentinels": 3, "mpiWorkers": 2},
        "backendEnvironment": render.backend_environment(parse("prod", stack_config("prod"))),
        "postgresWhoIsPrimary": "docker exec transvidio-prod-postgres-primary patronictl "
        "--config-file /var/lib/postgresql/run/patroni.yml list",
    }
    generated = {r.name: plain(r.outputs["result"]) for r in ev.of_type("random:index/randomPassword:RandomPassword")}
    app = generated["secrets-postgres-app"]
    nodes = "postgres-primary:5432,postgres-replica-1:5432,postgres-replica-2:5432"
    secret_exports = {name: plain(value) for name, (value, secret) in ev.exports.items() if secret}
    assert secret_exports == {
        "postgresPrimaryDsn": f"postgresql://transvidio:{app}@{nodes}/transvidio?target_session_attrs=read-write",
        "postgresStandbyDsn": f"postgresql://transvidio:{app}@{nodes}/transvidio"
        "?target_session_attrs=prefer-standby&load_balance_hosts=random",
        "postgresSuperuserPassword": generated["secrets-postgres-superuser"],
        "redisPassword": generated["secrets-redis"],
        "redisAdminPassword": generated["secrets-redis-admin"],
        "secretKey": generated["secrets-secret-key"],
        "apiTokens": {"default": generated["secrets-api-token-default"]},
    }


def test_each_data_tier_container_gets_exactly_the_environment_its_entrypoint_reads() -> None:
    ev = evaluated("prod")
    envs = {name.removeprefix("transvidio-prod-"): env_of(c) for name, c in ev.containers.items()}
    for node in ("postgres-primary", "postgres-replica-2"):
        assert envs[node] == {
            "PG_ROLE": "node",
            "PG_NODE": node,
            "PGBACKREST_CONFIG": "/etc/transvidio/postgres/pgbackrest.conf",
            "PGBACKREST_CONFIG_INCLUDE_PATH": "/etc/transvidio/secrets",
            "PGBACKREST_STANZA": "transvidio",
            "BACKUP_FULL_INTERVAL_MINUTES": "1440",
            "BACKUP_INCREMENTAL_INTERVAL_MINUTES": "60",
            "FAILOVER_DETECT_SECONDS": "5",
        }
    assert envs["etcd-3"] == {"PG_ROLE": "etcd", "PG_NODE": "etcd-3"}
    assert envs["postgres-credentials"] == {}
    sentinels = "10.211.1.30:26379,10.211.1.31:26379,10.211.1.32:26379"
    assert envs["redis-1"] == {
        "REDIS_MASTER_NAME": "transvidio",
        "REDIS_SENTINELS": sentinels,
        "INITIAL_MASTER": "10.211.1.20",
        "DOWN_AFTER_MS": "5000",
        "FAILOVER_TIMEOUT_MS": "60000",
        "REDIS_NODE": "redis-1",
        "REDIS_USER": "replica",
        "REDIS_PASSWORD_FILE": "/etc/transvidio/secrets/redis-replication-password",
        "DATA_SUBNET": "10.211.1.0/24",
    }
    assert envs["sentinel-2"] == {
        "REDIS_MASTER_NAME": "transvidio",
        "SENTINEL_NODE": "sentinel-2",
        "REDIS_USER": "sentinel",
        "REDIS_PASSWORD_FILE": "/etc/transvidio/secrets/redis-sentinel-password",
        "SENTINEL_ACL_FILE": "/etc/transvidio/secrets/sentinel-users.acl",
        "DATA_SUBNET": "10.211.1.0/24",
    }
    assert envs["mpi-worker-1"] == {"MPI_ROLE": "mpi-worker"}
    assert envs["mpi-master"] == {
        "MPI_HOSTFILE": "/etc/transvidio/mpi/hostfile",
        "MPI_ROLE": "mpi-master",
        **render.mpi_runner_environment(parse("prod", stack_config("prod"))),
    }
    assert envs["mpi-master"]["POSTGRES_PASSWORD_FILE"] == f"{render.SECRETS_DIR}/app-db-password"
    assert envs["nginx"] == render.nginx_environment()
    memory = {name: c.inputs["memory"] for name, c in ev.containers.items()}
    assert memory["transvidio-prod-etcd-1"] == 128 and memory["transvidio-prod-postgres-primary"] == 1024


def test_uploads_tls_ports_capabilities_and_healthchecks_per_role() -> None:
    ev = evaluated("prod")
    for name, container in ev.containers.items():
        for upload in uploads_of(container).values():
            if upload["permissions"] != "0400":  # config files: readable, owned by root
                assert (upload["permissions"], upload["owner"], upload["group"]) == ("0644", "0", "0"), name
        assert container.inputs.get("waitTimeout") == (300 if container.inputs.get("wait") else None), name
        role = labels_of(container)["io.transvidio.role"]
        expected_check = {
            "backend": ["CMD", "python3", "/usr/local/bin/healthcheck.py"],
            "nginx": ["CMD", "curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8080/nginx-status"],
            "postgres-credentials": ["CMD", "/usr/local/bin/credentials.sh", "check"],
            "redis-backup": ["CMD", "/usr/local/bin/redis-backup.sh", "check"],
        }.get(role, ["CMD", "/usr/local/bin/healthcheck.sh"])
        assert container.inputs["healthcheck"]["tests"] == expected_check, name
        adds = container.inputs["capabilities"].get("adds")
        if role.startswith("mpi"):  # sshd's, and nothing more
            assert adds == [
                "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "KILL", "NET_BIND_SERVICE", "SETGID", "SETUID",
                "SYS_CHROOT",
            ], name  # fmt: skip
        else:
            assert adds is None, name
    tls = evaluate("prod", {"nginx": {"httpsPort": 443}}, secret_config=PEM_PAIR).containers["transvidio-prod-nginx"]
    assert plain(tls.inputs["ports"]) == [
        {"internal": 8080, "external": 80, "ip": "0.0.0.0", "protocol": "tcp"},
        {"internal": 8443, "external": 443, "ip": "0.0.0.0", "protocol": "tcp"},
    ]
    secrets = {path: u for path, u in uploads_of(tls).items() if u["permissions"] == "0400"}
    assert {path: (u["content"], u["owner"]) for path, u in secrets.items()} == {
        f"{render.SECRETS_DIR}/tls.crt": (PEM_PAIR["tlsCertificate"], "33"),
        f"{render.SECRETS_DIR}/tls.key": (PEM_PAIR["tlsKey"], "33"),
    }


def test_make_render_writes_exactly_what_the_stack_uploads() -> None:
    """`make render` is for review: each file it writes is the one the containers get."""
    ev = evaluated("prod")
    uploaded: dict[str, set[str]] = {}
    for container in ev.containers.values():
        for path, upload in uploads_of(container).items():
            uploaded.setdefault(path, set()).add(upload["content"])
    directories = {"postgres": render.POSTGRES_CONF_DIR, "redis": render.REDIS_CONF_DIR, "nginx": render.NGINX_CONF_DIR}
    paths = {
        "mpi/hostfile": f"{render.MPI_CONF_DIR}/hostfile",
        "mpi/openmpi-mca-params.conf": "/home/app/.openmpi/mca-params.conf",
        "mpi/prte-mca-params.conf": "/home/app/.prte/mca-params.conf",
    }
    files = render.rendered_files(parse("prod", stack_config("prod")))
    for name, text in files.items():
        if name in ("mpi/known_hosts", "backend/environment"):
            continue
        directory, _, filename = name.partition("/")
        path = paths.get(name) or f"{directories[directory]}/{filename}"
        assert uploaded.get(path) == {text}, name
    # known_hosts: the same hosts, with placeholders where the stack has generated keys.
    hosts = [line.split()[0] for line in files["mpi/known_hosts"].splitlines()]
    [known_hosts] = uploaded["/etc/ssh/ssh_known_hosts"]
    assert hosts == [line.split()[0] for line in known_hosts.splitlines()]
    # The backend's environment, as it gets it (secrets are files: only their paths are here).
    backend = env_of(ev.containers["transvidio-prod-backend-1"])
    assert dict(line.split("=", 1) for line in files["backend/environment"].splitlines()) == backend


def test_the_redis_backup_job_copies_from_the_master_into_its_volume_and_a_restore_reads_it() -> None:
    ev = evaluated("prod")
    job = ev.containers["transvidio-prod-redis-backup"]
    assert env_of(job) == {
        "REDIS_MASTER_NAME": "transvidio",
        "REDIS_SENTINELS": "10.211.1.30:26379,10.211.1.31:26379,10.211.1.32:26379",
        "REDIS_USER": "replica",
        "REDIS_PASSWORD_FILE": "/etc/transvidio/secrets/redis-replication-password",
        "BACKUP_INTERVAL_MINUTES": "60",
        "BACKUP_RETENTION": "48",
    }
    assert {m["target"]: (m["source"], bool(m.get("readOnly"))) for m in mounts_of(job).values()} == {
        "/backups": ("transvidio-prod-redis-backups", False)
    }
    assert job.inputs["entrypoints"] == ["/usr/local/bin/redis-backup.sh", "serve"]
    # No restore configured: no data node reads the backups.
    for name, container in ev.containers.items():
        if labels_of(container)["io.transvidio.role"] == "redis":
            assert "/backups" not in mounts_of(container) and "RESTORE_FROM" not in env_of(container), name
    restoring = evaluate("prod", {"redis": {"restoreFrom": "latest"}})
    master = restoring.containers["transvidio-prod-redis-0"]
    assert env_of(master)["RESTORE_FROM"] == "latest"
    assert mounts_of(master)["/backups"]["readOnly"] is True
    assert "/backups" not in mounts_of(restoring.containers["transvidio-prod-redis-1"])  # only the initial master
    # With no schedule there is no job (the volume stays, for a restore).
    none = evaluate("prod", {"redis": {"backupIntervalMinutes": 0}})
    assert "transvidio-prod-redis-backup" not in none.containers
    assert "transvidio-prod-redis-backups" in {v.inputs["name"] for v in none.of_type("docker:index/volume:Volume")}


def test_each_role_gets_its_cpu_limit_in_the_form_the_provider_reads_back() -> None:
    cpus = {labels_of(c)["io.transvidio.role"]: c.inputs["cpus"] for c in evaluated("prod").containers.values()}
    assert cpus == {
        "postgres-primary": "2.0",
        "postgres-replica": "2.0",
        "postgres-credentials": "0.1",
        "etcd": "1.0",
        "redis": "1.0",
        "redis-backup": "0.25",
        "sentinel": "0.25",
        "mpi-master": "2.0",
        "mpi-worker": "2.0",
        "backend": "1.0",
        "nginx": "1.0",
    }
    tuned = evaluate("prod", {"backend": {"cpus": "1.5"}, "redis": {"sentinelCpus": 0.5}}).containers
    assert tuned["transvidio-prod-backend-2"].inputs["cpus"] == "1.5"
    assert tuned["transvidio-prod-sentinel-3"].inputs["cpus"] == "0.5"


S3_SECRETS = {
    "s3AccessKeyId": "AKIAEXAMPLE01",
    "s3SecretAccessKey": "an/s3+secret=key",
    "s3CaCertificate": PEM_PAIR["tlsCertificate"],
}
S3_CONFIG = {"postgres": {"backupRepository": "s3", "s3Endpoint": "s3.test", "s3Bucket": "backups"}}


def test_an_s3_repository_gives_only_the_postgres_nodes_a_route_out_and_its_credentials_the_store() -> None:
    ev = evaluate("prod", S3_CONFIG, secret_config=S3_SECRETS)
    assert_children_parented(ev)  # the egress network is the network component's child, named so
    networks = {r.inputs["name"]: r.inputs for r in ev.of_type("docker:index/network:Network")}
    assert networks["transvidio-prod-egress"]["internal"] is False
    assert networks["transvidio-prod-egress"]["ipamConfigs"] == [{"subnet": "10.211.3.0/24"}]
    on_egress = {name for name, c in ev.containers.items() if "transvidio-prod-egress" in networks_of(c)}
    assert on_egress == {
        f"transvidio-prod-{n}" for n in ("postgres-primary", "postgres-replica-1", "postgres-replica-2")
    }
    for name in on_egress:
        assert "ipv4Address" not in networks_of(ev.containers[name])["transvidio-prod-egress"]
    writer = uploads_of(ev.containers["transvidio-prod-postgres-credentials"])
    assert writer["/etc/transvidio/credentials/pgbackrest-s3.conf"]["content"] == render.pgbackrest_s3_credentials(
        "AKIAEXAMPLE01", "an/s3+secret=key"
    )
    assert writer["/etc/transvidio/credentials/s3-ca.crt"]["content"] == PEM_PAIR["tlsCertificate"]
    assert is_secret(ev.containers["transvidio-prod-postgres-credentials"].inputs["uploads"])
    # The S3 secret is in no plain input and no output.
    leaked = [
        r.name
        for r in ev.registrations
        if "an/s3+secret=key" in json.dumps(plain({k: v for k, v in r.inputs.items() if not is_secret(v)}))
    ]
    assert leaked == []
    assert not any("an/s3+secret=key" in json.dumps(plain(v)) for v, _ in ev.exports.values())
    # No repository volume: the bucket is the repository.
    assert "transvidio-prod-postgres-backups" not in {
        v.inputs["name"] for v in ev.of_type("docker:index/volume:Volume")
    }
    assert all(render.PGBACKREST_REPO_DIR not in mounts_of(c) for c in ev.containers.values())
    # Without S3: no egress network, nobody on it.
    assert "transvidio-prod-egress" not in {
        r.inputs["name"] for r in evaluated("prod").of_type("docker:index/network:Network")
    }
