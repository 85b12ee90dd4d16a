"""The swarm target under Pulumi mocks: the same components, registered as swarm services."""

from __future__ import annotations

import base64
import collections
import itertools
import json
import re
from functools import cache
from typing import Any

import pytest

from components import render
from components.container import SERVICE_UIDS, config_file, duration
from components.settings import SettingsError, parse
from components.swarm import file_docker_name
from components.topology import Topology
from tests.program import Evaluation, assert_children_parented, evaluate, is_secret, plain, stack_config
from tests.test_program import S3_CONFIG, S3_SECRETS

SERVICE = "docker:index/service:Service"
SECRET = "docker:index/secret:Secret"
CONFIG = "docker:index/serviceConfig:ServiceConfig"
NODES = ["n1", "n2", "n3"]
SWARM: dict[str, Any] = {
    "deploy": {
        "target": "swarm",
        "swarmNodes": NODES,
        "endpointMode": "dnsrr",
        "publishMode": "host",
        "sharedPath": "/srv/transvidio",
    },
    "images": {"registry": "registry.example:5000"},
}
PINNED_ROLES = ("postgres-primary", "postgres-replica", "etcd", "redis", "sentinel", "mpi-master", "mpi-worker")


@cache
def evaluated(stack: str = "prod") -> Evaluation:
    return evaluate(stack, SWARM)


def services() -> dict[str, dict[str, Any]]:
    return {r.inputs["name"]: plain(r.inputs) for r in evaluated().of_type(SERVICE)}


def label_of(service: dict[str, Any], key: str) -> str:
    return str({item["label"]: item["value"] for item in service["labels"]}[f"io.transvidio.{key}"])


def pinned_node(service: dict[str, Any]) -> str | None:
    constraints = service["taskSpec"].get("placement", {}).get("constraints") or []
    if not constraints:
        return None
    (constraint,) = constraints
    label, node = constraint.split("==")
    assert label == "node.labels.transvidio.node"
    return str(node)


def test_a_swarm_stack_registers_services_and_no_container_or_host_volume() -> None:
    ev = evaluated()
    types = collections.Counter(r.type for r in ev.registrations)
    assert types["docker:index/container:Container"] == 0
    assert types["docker:index/volume:Volume"] == 0  # each node makes its own, the shared ones are paths
    s = parse("prod", stack_config("prod", SWARM))
    topo = Topology(s)
    # One service per stateful node (no credentials writer: secrets are swarm secrets), one for the
    # backends, one for nginx, one for the Redis backup job.
    expected = {n.container_name for n in topo.all_nodes if n.role not in ("backend", "postgres-credentials")}
    assert set(services()) == expected | {f"{s.prefix}-backend"}


def test_networks_are_overlays_the_data_one_internal_and_encrypted_on_request() -> None:
    networks = {r.inputs["name"]: plain(r.inputs) for r in evaluated().of_type("docker:index/network:Network")}
    assert {name: (n["driver"], n.get("internal", False)) for name, n in networks.items()} == {
        "transvidio-prod-edge": ("overlay", False),
        "transvidio-prod-data": ("overlay", True),
    }
    assert all("options" not in n for n in networks.values())
    encrypted = evaluate("prod", {**SWARM, "deploy": {**SWARM["deploy"], "encryptOverlay": True}})
    for network in encrypted.of_type("docker:index/network:Network"):
        assert plain(network.inputs)["options"] == {"encrypted": "true"}


def test_each_stateful_node_is_one_task_pinned_so_that_losing_any_node_keeps_every_tier_working() -> None:
    by_role: dict[str, list[str]] = collections.defaultdict(list)
    for name, service in services().items():
        role = label_of(service, "role")
        if role in PINNED_ROLES:
            assert service["mode"] == {"replicated": {"replicas": 1}}, name
            assert service["updateConfig"]["order"] == "stop-first", name
            node = pinned_node(service)
            assert node in NODES, name
            by_role[role].append(node)
    assert sorted(by_role["postgres-primary"] + by_role["postgres-replica"]) == NODES  # primary and replicas apart
    assert sorted(by_role["etcd"]) == sorted(by_role["sentinel"]) == NODES
    assert sorted(by_role["mpi-master"] + by_role["mpi-worker"]) == NODES  # one MPI node per node
    for lost in NODES:
        survivors = {role: [n for n in nodes if n != lost] for role, nodes in by_role.items()}
        assert len(survivors["postgres-primary"] + survivors["postgres-replica"]) >= 2, lost
        assert len(survivors["redis"]) >= 2, lost  # a replica to promote
        assert len(survivors["sentinel"]) * 2 > len(by_role["sentinel"]), lost  # a majority
        assert len(survivors["etcd"]) * 2 > len(by_role["etcd"]), lost
        assert len(survivors["mpi-master"] + survivors["mpi-worker"]) == len(NODES) - 1, lost


def test_backends_are_one_replicated_service_spread_and_nginx_is_on_every_node_published_as_configured() -> None:
    s = parse("prod", stack_config("prod", SWARM))
    backend = services()[f"{s.prefix}-backend"]
    assert backend["mode"] == {"replicated": {"replicas": s.backend.replica_count}}
    assert backend["taskSpec"]["placement"] == {"prefs": ["spread=node.labels.transvidio.node"]}
    assert backend["updateConfig"]["order"] == "start-first"
    assert "hostname" not in backend["taskSpec"]["containerSpec"]  # tasks of one service: theirs
    edge = [n for n in backend["taskSpec"]["networksAdvanceds"] if n.get("aliases")]
    assert [n["aliases"] for n in edge] == [[render.BACKENDS_ALIAS]]
    nginx = services()[f"{s.prefix}-nginx"]
    # One per node, replicated (not global) so that `pulumi up` waits for them.
    assert nginx["mode"] == {"replicated": {"replicas": len(NODES)}}
    assert nginx["taskSpec"]["placement"] == {"maxReplicas": 1, "prefs": ["spread=node.labels.transvidio.node"]}
    assert nginx["endpointSpec"] == {
        "mode": "dnsrr",
        "ports": [{"targetPort": 8080, "publishedPort": 80, "protocol": "tcp", "publishMode": "host"}],
    }
    assert nginx["updateConfig"]["order"] == "start-first"


def test_every_service_updates_one_task_at_a_time_rolls_back_by_itself_and_pulumi_waits_for_it() -> None:
    for registration in evaluated().of_type(SERVICE):
        assert registration.options["delete_before_replace"] is True, registration.name  # a fixed name
    for name, service in services().items():
        assert service["updateConfig"]["parallelism"] == 1, name
        assert service["updateConfig"]["failureAction"] == "rollback", name
        assert service["rollbackConfig"]["parallelism"] == 1, name
        assert service["rollbackConfig"]["order"] == service["updateConfig"]["order"], name
        # A rollback that fails too stops for an operator, rather than rolling back and forth.
        assert service["rollbackConfig"]["failureAction"] == "pause", name
        assert service["convergeConfig"]["timeout"] == "10m0s", name
        spec = service["taskSpec"]["containerSpec"]
        assert spec["capDrops"] == ["ALL"], name
        # A name the swarm's DNS does not know (a task still starting) fails in a second.
        assert spec["env"]["RES_OPTIONS"] == "timeout:1 attempts:1", name
        assert spec["healthcheck"]["tests"][0] == "CMD", name
        assert service["taskSpec"]["restartPolicy"]["condition"] == "any", name
        assert service["taskSpec"]["resources"]["limits"]["memoryBytes"] > 0, name


def test_images_are_pushed_to_the_registry_and_services_run_them_by_digest() -> None:
    ev = evaluated()
    images = {r.name: plain(r.inputs) for r in ev.of_type("docker:index/image:Image")}
    for name, image in images.items():
        assert image["imageName"].startswith("registry.example:5000/transvidio-prod-"), name
        assert image.get("skipPush") is False, name
    digests = {plain(r.outputs)["repo_digest"] for r in ev.of_type("docker:index/image:Image")}
    for name, service in services().items():
        assert service["taskSpec"]["containerSpec"]["image"] in digests, name


def test_a_backend_image_named_in_config_is_run_as_named_and_not_built_or_pulled_by_the_program() -> None:
    # A swarm's nodes pull it from its registry themselves: a release rolls by naming its image.
    named = "registry.example:5000/transvidio-backend:v2"
    ev = evaluate("prod", {**SWARM, "images": {**SWARM["images"], "backend": named}})
    backend = next(plain(r.inputs) for r in ev.of_type(SERVICE) if r.inputs["name"] == "transvidio-prod-backend")
    assert backend["taskSpec"]["containerSpec"]["image"] == named
    built = {plain(r.inputs)["imageName"] for r in ev.of_type("docker:index/image:Image")}
    assert not any("backend" in name for name in built), built
    assert list(ev.of_type("docker:index/remoteImage:RemoteImage")) == []


def files_of(service: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {f["fileName"]: f for f in service["taskSpec"]["containerSpec"].get(kind, [])}


def test_secret_files_are_swarm_secrets_owned_by_the_service_user_and_configs_are_readable_configs() -> None:
    ev = evaluated()
    secrets = {r.inputs["name"]: r for r in ev.of_type(SECRET)}
    configs = {r.inputs["name"]: r for r in ev.of_type(CONFIG)}
    for name, service in services().items():
        uid = str(SERVICE_UIDS[label_of(service, "component")])
        for path, ref in files_of(service, "secrets").items():
            secret = secrets[ref["secretName"]]
            assert is_secret(secret.inputs["data"]), (name, path)
            assert (ref["fileMode"], ref["fileGid"]) == (0o400, ref["fileUid"]), (name, path)
            assert ref["fileUid"] in (uid, "0"), (name, path)  # root only for sshd's host key
        for path, ref in files_of(service, "configs").items():
            assert (ref["fileMode"], ref["fileUid"]) == (0o644, "0"), (name, path)
            assert not is_secret(configs[ref["configName"]].inputs["dataRaw"]), (name, path)
        env = service["taskSpec"]["containerSpec"].get("env", {})
        for secret in secrets.values():
            value = base64.b64decode(plain(secret.inputs["data"])).decode()
            assert not any(value in v for v in env.values()), (name, secret.inputs["name"])


def test_the_postgres_nodes_get_the_tiers_secrets_as_files_where_one_host_mounts_its_store() -> None:
    node = services()["transvidio-prod-postgres-replica-1"]
    assert sorted(files_of(node, "secrets")) == [
        f"{render.SECRETS_DIR}/{name}"
        for name in sorted(
            ["app-db-password", "patroni-api-password", "postgres-password", "replication-password", "rewind-password"]
        )
    ]
    assert render.SECRETS_DIR not in {m["target"] for m in node["taskSpec"]["containerSpec"]["mounts"]}


def secret_names(ev: Evaluation) -> dict[str, str]:
    return {r.name: r.inputs["name"] for r in ev.of_type(SECRET)}


def test_a_rotated_secret_is_a_new_swarm_secret_for_exactly_the_services_that_use_it() -> None:
    before = secret_names(evaluated())
    after = secret_names(evaluate("prod", SWARM, secret_config={"redisPassword": "r" * 32}))
    assert before.keys() == after.keys()
    changed = sorted(name for name in before if before[name] != after[name])
    # The app user's password is in every Redis ACL (nodes and Sentinels, as its hash) and the backends' file.
    assert changed == sorted(
        [f"redis-{i}-etc-transvidio-secrets-redis-users-acl" for i in range(3)]
        + [f"redis-sentinel-{i}-etc-transvidio-secrets-sentinel-users-acl" for i in range(1, 4)]
        + ["backend-etc-transvidio-secrets-redis-password"]
    )


def test_shared_volumes_are_directories_of_the_shared_storage_and_node_volumes_are_made_by_the_node() -> None:
    s = parse("prod", stack_config("prod", SWARM))
    mounts = {
        (name, m["target"]): m
        for name, service in services().items()
        for m in service["taskSpec"]["containerSpec"].get("mounts", [])
    }
    uploads = mounts[(f"{s.prefix}-backend", render.UPLOADS_DIR)]
    assert (uploads["type"], uploads["source"]) == ("bind", f"/srv/transvidio/{s.prefix}-uploads")
    assert mounts[(f"{s.prefix}-mpi-worker-1", render.UPLOADS_DIR)]["readOnly"] is True
    data = mounts[(f"{s.prefix}-redis-0", "/data")]
    assert (data["type"], data["source"]) == ("volume", f"{s.prefix}-redis-0-data")
    labels = {item["label"]: item["value"] for item in data["volumeOptions"]["labels"]}
    assert labels["io.transvidio.stack"] == "prod"


def test_evaluating_a_swarm_stack_twice_gives_identical_inputs() -> None:
    first = {r.urn: plain(r.inputs) for r in evaluate("prod", SWARM).registrations}
    second = {r.urn: plain(r.inputs) for r in evaluate("prod", SWARM).registrations}
    assert first == second


def test_on_a_swarm_the_nodes_find_each_other_by_name() -> None:
    s = parse("prod", stack_config("prod", SWARM))
    topo = Topology(s)
    assert all(node.data_ip is None and node.edge_ip is None for node in topo.all_nodes)
    sentinel = render.sentinel_conf(s, topo.sentinels[0])
    # The initial master by name (the entrypoint resolves it when it seeds the Sentinel's
    # state); what Sentinel announces and hands out are addresses, found at start.
    assert "sentinel monitor transvidio redis-0 6379 2" in sentinel.splitlines()
    assert "sentinel announce-hostnames no" in sentinel.splitlines()
    assert "announce-ip" not in sentinel and "announce-ip" not in render.redis_conf(s, topo.redis_nodes[1])
    etcd = json.loads(render.etcd_yml(s, topo.etcd_nodes[1]).split("\n", 1)[1])
    assert etcd["listen-peer-urls"] == "http://0.0.0.0:2380"
    assert etcd["listen-client-urls"] == "http://0.0.0.0:2379"
    assert etcd["initial-advertise-peer-urls"] == "http://etcd-2:2380"
    assert etcd["initial-cluster"] == "etcd-1=http://etcd-1:2380,etcd-2=http://etcd-2:2380,etcd-3=http://etcd-3:2380"
    assert render.authorized_keys(s, "ssh-ed25519 KEY") == 'restrict,from="10.211.1.0/24" ssh-ed25519 KEY\n'
    assert render.known_hosts(s, ["k0", "k1", "k2"]).splitlines()[0] == "mpi-master k0"
    patroni = render.patroni_yml(s, topo.postgres_replicas[0])
    assert '"connect_address": "postgres-replica-1:5432"' in patroni


SWARM_ERRORS = [
    (
        {"deploy": {**SWARM["deploy"], "swarmNodes": ["n1", "n2"]}},
        "transvidio:deploy.swarmNodes=['n1', 'n2']: deploy.target=swarm needs at least 3 nodes (the transvidio.node "
        "label of each), so that losing one keeps a majority of Sentinels and etcd members",
    ),
    (
        {"images": {"registry": ""}},
        "transvidio:images.registry is empty with deploy.target=swarm: set the registry every node pulls the stack's "
        "images from",
    ),
    (
        {"deploy": {**SWARM["deploy"], "sharedPath": ""}},
        "transvidio:deploy.sharedPath is empty with deploy.target=swarm: set a directory on storage shared by every "
        "node (NFS, CephFS...), for uploads and outputs",
    ),
    (
        {"redis": {"sentinels": 4, "quorum": 3}},
        "transvidio:redis.sentinels=4 over 3 swarm nodes: losing one node leaves 2, not a majority; use at least 3, "
        "spread one per node",
    ),
    (
        {"postgres": {"consensusNodes": 1}},
        "transvidio:postgres.consensusNodes=1 over 3 swarm nodes: losing one node leaves 0, not a majority; use at "
        "least 3, spread one per node",
    ),
    (
        {"deploy": {**SWARM["deploy"], "swarmNodes": ["n1", "n2", "N3"]}},
        "transvidio:deploy.swarmNodes=['n1', 'n2', 'N3']: must be a list of up to 16 distinct node labels of "
        'lower-case letters, digits and \'-\', such as ["n1", "n2", "n3"]',
    ),
    (
        {"deploy": {**SWARM["deploy"], "target": "kubernetes"}},
        "transvidio:deploy.target='kubernetes': must be one of containers, swarm",
    ),
    (
        {"deploy": {**SWARM["deploy"], "sharedPath": "srv/shared"}},
        "transvidio:deploy.sharedPath='srv/shared': must be an absolute path of letters, digits, '.', '_' and '-', "
        "such as /srv/transvidio",
    ),
    (
        {"deploy": {**SWARM["deploy"], "sharedPath": 5}},
        "transvidio:deploy.sharedPath=5: must be an absolute path of letters, digits, '.', '_' and '-', "
        "such as /srv/transvidio",
    ),
    (
        {"images": {"registry": "registry example"}},
        "transvidio:images.registry='registry example': must be a registry host, optionally with :port, such as "
        "registry.example:5000",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), SWARM_ERRORS, ids=[m[:48] for _, m in SWARM_ERRORS])
def test_a_wrong_swarm_setting_is_named_before_anything_is_registered(overrides: dict[str, Any], message: str) -> None:
    config = stack_config("prod", SWARM)
    for key, value in overrides.items():
        config[key] = {**config[key], **value}
    with pytest.raises(SettingsError) as raised:
        parse("prod", config)
    assert str(raised.value) == message


def test_a_swarm_publishes_only_nginx() -> None:
    config = stack_config("prod", SWARM)
    config["redis"] = {**config["redis"], "publishPort": 6379}
    with pytest.raises(SettingsError) as raised:
        parse("prod", config)
    assert str(raised.value) == (
        "transvidio:redis.publishPort is set with deploy.target=swarm: a swarm publishes only nginx; set it to 0"
    )


def test_etcd_members_are_healthy_once_serving_so_that_their_peers_can_resolve_them() -> None:
    for name, service in services().items():
        tests = service["taskSpec"]["containerSpec"]["healthcheck"]["tests"]
        if label_of(service, "role") == "etcd":
            assert tests == ["CMD", "/usr/local/bin/healthcheck.sh", "serving"], name
        else:
            assert "serving" not in tests, name


def test_each_stateful_tier_updates_one_node_after_another() -> None:
    # Pulumi updates what does not depend on each other at once: without the chain, a rotated
    # secret or a new image would restart every node of a tier together on a swarm.
    ev = evaluated()
    urn_of = {r.inputs["name"]: r.urn for r in ev.of_type(SERVICE)}
    depends = {r.inputs["name"]: set(r.options["dependencies"]) for r in ev.of_type(SERVICE)}
    topo = Topology(parse("prod", stack_config("prod", SWARM)))
    tiers = [
        topo.etcd_nodes,
        [topo.postgres_primary, *topo.postgres_replicas],
        topo.redis_nodes,
        topo.sentinels,
    ]
    for tier in tiers:
        for before, node in itertools.pairwise(tier):
            assert urn_of[before.container_name] in depends[node.container_name], (before.hostname, node.hostname)
    # Sentinels and data nodes roll side by side: a node with data waits for a Sentinel.
    assert not any(
        urn_of[n.container_name] in depends[s.container_name] for s in topo.sentinels for n in topo.redis_nodes
    )


def network_names(ev: Evaluation) -> dict[str, str]:
    """A network's id (as a service names it) -> its name (as a container names it)."""
    return {f"{r.name}-id": r.inputs["name"] for r in ev.of_type("docker:index/network:Network")}


def test_each_service_runs_what_its_node_runs_as_a_container_on_one_host() -> None:
    # The swarm target changes where a node runs, not what it runs: command, environment,
    # files, mounts, limits, capabilities, healthcheck and logs are the one-host container's,
    # translated field by field. Compared with the S3 repository on, for the egress network.
    swarm_ev = evaluate("prod", {**SWARM, **S3_CONFIG}, secret_config=S3_SECRETS)
    host_ev = evaluate("prod", S3_CONFIG, secret_config=S3_SECRETS)
    on_host = {name: plain(r.inputs) for name, r in host_ev.containers.items()}
    ids = network_names(swarm_ev)
    by_address: dict[str, str] = {
        str(n.data_ip): n.hostname for n in Topology(parse("prod", stack_config("prod"))).all_nodes
    }
    compared = set()

    def as_name(address: re.Match[str]) -> str:
        return by_address.get(address.group(), address.group())

    for registration in swarm_ev.of_type(SERVICE):
        service = plain(registration.inputs)
        name = service["name"]
        replicated = name in ("transvidio-prod-backend", "transvidio-prod-nginx")
        container = on_host["transvidio-prod-backend-1" if name == "transvidio-prod-backend" else name]
        task, spec = service["taskSpec"], service["taskSpec"]["containerSpec"]
        assert spec.get("commands") == container.get("entrypoints"), name
        assert spec.get("args") == container.get("command"), name
        # On one host the nodes are addresses, on a swarm names (see test_on_a_swarm_the_nodes_find...).
        env = {
            key: re.sub(r"\d+\.\d+\.\d+\.\d+", as_name, value)
            for key, value in (str(item).split("=", 1) for item in container.get("envs", []))
        }
        assert spec["env"] == {**env, "RES_OPTIONS": "timeout:1 attempts:1"}, name
        assert (spec["capDrops"], spec.get("capAdds")) == (
            container["capabilities"]["drops"],
            container["capabilities"].get("adds"),
        ), name
        # The same check, always at the pace of what is waited on: a swarm waits on every
        # task's health (convergence, each step of a rolling update).
        health = {**container["healthcheck"], "interval": "5s", "retries": 5}
        if label_of(service, "role") == "etcd":  # see test_etcd_members_are_healthy_once_serving...
            health = {**health, "tests": [*health["tests"], "serving"]}
        assert spec["healthcheck"] == health, name
        assert spec["stopGracePeriod"] == duration(int(container["destroyGraceSeconds"])), name
        assert task["logDriver"] == {"name": container["logDriver"], "options": container["logOpts"]}, name
        assert task["resources"]["limits"] == {
            "memoryBytes": container["memory"] * 1024 * 1024,
            "nanoCpus": round(float(container["cpus"]) * 1e9),
        }, name
        files = {
            f["fileName"]: (f["fileUid"], f["fileGid"], f["fileMode"])
            for f in [*spec.get("secrets", []), *spec.get("configs", [])]
            # On one host a PostgreSQL node's secrets are the credentials writer's volume.
            if not (label_of(service, "component") == "postgres" and f["fileName"].startswith(render.SECRETS_DIR))
        }
        assert files == {
            u["file"]: (u["owner"], u["group"], int(u["permissions"], 8)) for u in container.get("uploads", [])
        }, name
        mounts = {m["target"]: m for m in spec.get("mounts", [])}
        shm = mounts.pop("/dev/shm", None)
        if container.get("shmSize"):
            size = {"sizeBytes": container["shmSize"] * 1024 * 1024}
            assert shm == {"target": "/dev/shm", "type": "tmpfs", "tmpfsOptions": size}, name
        else:
            assert shm is None, name
        assert {t: m["readOnly"] for t, m in mounts.items()} == {
            # On one host the credentials writer's volume; on a swarm, swarm secrets (tested above).
            m["target"]: m.get("readOnly", False)
            for m in container.get("mounts", [])
            if m["target"] != render.SECRETS_DIR
        }, name
        for target, mount in mounts.items():
            # A read-only volume is not filled from the image: it is what another node wrote.
            no_copy = mount.get("volumeOptions", {}).get("noCopy")
            assert no_copy is (True if mount["readOnly"] and mount["type"] == "volume" else None), (name, target)
        attached = [(ids[n["id"]], n.get("aliases")) for n in task["networksAdvanceds"]]
        expected = [
            (n["name"], [a for a in n.get("aliases", []) if not replicated or a != container["hostname"]] or None)
            for n in container["networksAdvanced"]
        ]
        assert sorted(attached, key=str) == sorted(expected, key=str), name
        compared.add(name)
    assert len(compared) == len(swarm_ev.of_type(SERVICE))


def test_only_nginx_publishes_a_port_on_a_swarm() -> None:
    published = {name for name, s in services().items() if s.get("endpointSpec", {}).get("ports")}
    assert published == {"transvidio-prod-nginx"}


def test_swarm_configs_and_secrets_are_children_of_their_component() -> None:
    assert_children_parented(evaluated())


def test_a_swarm_file_is_named_for_its_node_and_file_in_64_characters_and_a_new_content_is_a_new_name() -> None:
    s = parse("prod", stack_config("prod", SWARM))
    file = config_file("/etc/transvidio/a dir/odd name+1.conf", "")
    name = file_docker_name(s, "redis-0", file, "one")
    readable, digest = name.rsplit("-", 1)
    assert readable == "transvidio-prod-redis-0-odd-name-1.conf"
    assert re.fullmatch(r"[0-9a-f]{12}", digest), name
    assert file_docker_name(s, "redis-0", file, "one") == name  # the same version: the same name
    assert file_docker_name(s, "redis-0", file, "two") != name
    moved = config_file("/etc/other/odd name+1.conf", "")
    assert file_docker_name(s, "redis-0", moved, "one") != name  # same base name, another file
    # Docker refuses a config or secret name over 64 characters: the readable part is cut.
    long_file = config_file("/etc/" + "x" * 80 + ".conf", "")
    long_name = file_docker_name(s, "postgres-replica-12", long_file, "one")
    assert len(long_name) == 64 - 3 and long_name.startswith("transvidio-prod-postgres-replica-12-xxx"), long_name
    names = [ref["secretName"] for service in services().values() for ref in files_of(service, "secrets").values()]
    names += [ref["configName"] for service in services().values() for ref in files_of(service, "configs").values()]
    assert all(len(n) <= 64 and re.fullmatch(r"[A-Za-z0-9_.-]+", n) for n in names), names
