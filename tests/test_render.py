"""The renderers on their own: pure functions from settings to the files containers get."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
from typing import Any, cast

import pytest
import yaml

from components import render, topology
from components.settings import TLS_SECRETS, Settings, SettingsError, parse
from components.topology import Topology
from tests import pg_server
from tests.program import PROJECT_DIR, stack_config


def settings(stack: str = "prod", **overrides: dict[str, Any]) -> Settings:
    return parse(stack, stack_config(stack, overrides))


def upstream_block(conf: str) -> str:
    return conf[conf.index("upstream backends {") : conf.index("}", conf.index("upstream backends {"))]


def test_nginx_conf_does_not_change_with_the_pool_size() -> None:
    confs = {render.nginx_conf(settings(backend={"replicas": count})) for count in (1, 3, 5)}
    assert len(confs) == 1
    block = upstream_block(confs.pop())
    assert re.findall(r"^\s*(\w+)", block, re.MULTILINE) == ["upstream", "zone", "include", "keepalive"]
    assert f"include {render.NGINX_UPSTREAMS_FILE};" in block


def test_nginx_environment_names_the_alias_every_backend_carries() -> None:
    env = render.nginx_environment()
    assert env == {
        "UPSTREAM_NAME": render.BACKENDS_ALIAS,
        "UPSTREAM_PORT": "8000",
        "UPSTREAM_FILE": render.NGINX_UPSTREAMS_FILE,
        "UPSTREAM_SERVER_PARAMS": "max_fails=2 fail_timeout=10s",
    }


def block(conf: str, opening: str) -> str:
    """The text of the block that starts with `opening` (up to its matching brace)."""
    start = conf.index(opening + " {")
    depth = 0
    for end in range(conf.index("{", start), len(conf)):
        depth += {"{": 1, "}": -1}.get(conf[end], 0)
        if depth == 0:
            return conf[start : end + 1]
    raise ValueError(f"unclosed block {opening}")


def test_nginx_conf_carries_the_proxy_contract() -> None:
    s = settings()
    conf = render.nginx_conf(s)
    server = block(conf, "server")
    # Small bodies everywhere; the upload limit only where uploads go.
    assert "client_max_body_size 64k;" in server.split("location")[0]
    assert "client_max_body_size 500m;" in block(conf, "location = /api/uploads")
    assert conf.count("client_max_body_size") == 2
    # Retried on a dead or broken backend, never on the app's own 503 (a degraded dependency).
    api_locations = [block(conf, f"location {name}") for name in ("= /api/health", "= /api/uploads", "/api/")]
    for location in api_locations:
        assert "proxy_pass http://backends;" in location
        assert "proxy_next_upstream error timeout http_502 http_504;" in location
    assert "http_503" not in conf and "non_idempotent" not in conf
    # An API answer stuck on a gone backend (a kept-alive connection to a lost node) is given
    # up, and a GET retried elsewhere, after 10 s; an upload's answer may wait for its body.
    read_timeouts = [
        line.strip() for location in api_locations for line in location.splitlines() if "read_timeout" in line
    ]
    assert read_timeouts == ["proxy_read_timeout 10s;", "proxy_read_timeout 300s;", "proxy_read_timeout 10s;"]
    assert "proxy_set_header Upgrade $http_upgrade;" in conf
    assert "proxy_set_header Connection $connection_upgrade;" in conf
    assert f"alias {render.OUTPUTS_DIR}/;" in conf
    assert "worker_processes 4;" in conf and "worker_connections 2048;" in conf
    # Status and readiness only for the cluster: the gateway (the host, anything published) first refused.
    for name in ("= /nginx-status", "= /api/health"):
        rules = [
            line.strip()
            for line in block(conf, f"location {name}").splitlines()
            if line.strip()[:5] in ("allow", "deny ")
        ]
        assert rules == ["deny 10.211.0.1;", "allow 127.0.0.1;", "allow 10.211.0.0/24;", "deny all;"], name
    for header in ("X-Content-Type-Options nosniff", "X-Frame-Options DENY", "Referrer-Policy no-referrer"):
        assert f"add_header {header} always;" in server
    assert "ssl_certificate" not in conf and "Strict-Transport-Security" not in conf


@pytest.mark.parametrize(
    ("https_port", "location"), [(443, "https://$host$request_uri"), (8443, "https://$host:8443$request_uri")]
)
def test_with_tls_http_only_redirects_and_https_serves_with_hsts(https_port: int, location: str) -> None:
    s = parse("prod", stack_config("prod", {"nginx": {"httpsPort": https_port}}), secrets_set=TLS_SECRETS)
    conf = render.nginx_conf(s)
    http_server, https_server = conf.split("    server {")[1:]
    assert "listen 8080;" in http_server and "proxy_pass" not in http_server
    assert f"return 301 {location};" in http_server
    assert "location = /health" in http_server and "location = /nginx-status" in http_server
    assert "listen 8443 ssl;" in https_server
    assert f"ssl_certificate {render.SECRETS_DIR}/tls.crt;" in https_server
    assert f"ssl_certificate_key {render.SECRETS_DIR}/tls.key;" in https_server
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in https_server
    assert 'add_header Strict-Transport-Security "max-age=31536000" always;' in https_server
    assert "location /api/ {" in https_server and "location = /api/uploads {" in https_server


def test_sentinel_monitor_line_uses_the_quorum_and_the_initial_master() -> None:
    s = settings(redis={"sentinels": 5, "quorum": 3})
    conf = render.sentinel_conf(s, Topology(s).sentinels[4])
    assert "sentinel monitor transvidio 10.211.1.20 6379 3" in conf  # redis-0's fixed address
    # Each Sentinel's entrypoint announces its own address; never a name.
    assert "announce-ip" not in conf
    assert "sentinel resolve-hostnames yes" in conf and "sentinel announce-hostnames no" in conf
    assert "sentinel down-after-milliseconds transvidio 5000" in conf
    assert "sentinel failover-timeout transvidio 60000" in conf
    # resolve-hostnames must precede the monitor line that names a host.
    assert conf.index("resolve-hostnames") < conf.index("sentinel monitor")


def test_redis_conf_persists_and_bounds_writes() -> None:
    s = settings()
    conf = render.redis_conf(s, Topology(s).redis_nodes[2])
    for line in (
        "appendonly yes",
        "min-replicas-to-write 1",
        "min-replicas-max-lag 10",
        f"maxmemory {1024**3}",
        "maxmemory-policy allkeys-lru",
        # A replica that must sync in full starts at once: a failover waits for it.
        "repl-diskless-sync yes",
        "repl-diskless-sync-delay 0",
    ):
        assert line in conf.splitlines()
    assert "requirepass" not in conf  # the password is added at start from the secret file


def test_hostfile_and_known_hosts_list_every_mpi_node() -> None:
    s = settings(mpi={"workers": 3, "slotsPerNode": 2})
    assert render.hostfile(s).splitlines() == [
        "mpi-master slots=2",
        "mpi-worker-1 slots=2",
        "mpi-worker-2 slots=2",
        "mpi-worker-3 slots=2",
    ]
    keys = [f"ssh-ed25519 KEY{i}\n" for i in range(4)]
    assert render.known_hosts(s, keys).splitlines() == [
        "mpi-master,10.211.1.40 ssh-ed25519 KEY0",
        "mpi-worker-1,10.211.1.41 ssh-ed25519 KEY1",
        "mpi-worker-2,10.211.1.42 ssh-ed25519 KEY2",
        "mpi-worker-3,10.211.1.43 ssh-ed25519 KEY3",
    ]


def test_mpi_is_tcp_only_pinned_to_the_data_subnet_unbound_and_strict_about_host_keys() -> None:
    # Exactly these parameters: tests/e2e/test_rendered_configs.py proves Open MPI and PRRTE
    # take each one (a parameter they do not know is ignored silently).
    s = settings()
    assert render.openmpi_mca_params(s) == render.HEADER + "btl = self,tcp\nbtl_tcp_if_include = 10.211.1.0/24\n"
    assert render.prte_mca_params(s) == render.HEADER + (
        "prte_if_include = 10.211.1.0/24\n"
        "hwloc_default_binding_policy = none\n"
        "plm_ssh_no_tree_spawn = 1\n"
        "plm_ssh_args = -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=10\n"
        "oob_tcp_keepalive_time = 5\n"
        "oob_tcp_keepalive_intvl = 2\n"
        "oob_tcp_keepalive_probes = 3\n"
    )


def test_pg_hba_is_exactly_these_rules_in_this_order() -> None:
    s = settings()
    rows = [line.split() for line in render.pg_hba_conf(s).splitlines() if line and not line.startswith("#")]
    # First match wins: local peer for the superuser, and for the node's own OS user as the
    # replication role on the socket (Patroni asks its own node for its timeline: no password a
    # rotation changes), SCRAM from the data subnet for the three roles (pg_rewind's only to the
    # postgres database), and nothing else from anywhere.
    assert rows == [
        ["local", "all", "postgres", "peer"],
        ["local", "replication", "replicator", "peer", "map=local-replication"],
        ["host", "replication", "replicator", "10.211.1.0/24", "scram-sha-256"],
        ["host", "postgres", "rewinder", "10.211.1.0/24", "scram-sha-256"],
        ["host", "transvidio", "transvidio", "10.211.1.0/24", "scram-sha-256"],
        ["host", "all", "all", "0.0.0.0/0", "reject"],
    ]


# What Patroni passes on postgres' command line (patroni/postgresql/config.py, CMDLINE_OPTIONS):
# a value for one of these in postgresql.conf would be overridden without a word.
PATRONI_OWNED = {
    "listen_addresses", "port", "cluster_name", "wal_level", "hot_standby", "max_connections",
    "max_wal_senders", "wal_keep_segments", "wal_keep_size", "max_prepared_transactions",
    "max_locks_per_transaction", "track_commit_timestamp", "max_replication_slots",
    "max_worker_processes", "wal_log_hints",
}  # fmt: skip


def test_postgresql_conf_holds_the_sizes_and_nothing_patroni_owns() -> None:
    values = conf_values(render.postgresql_conf(settings()))
    assert {k: values[k] for k in ("shared_buffers", "work_mem", "maintenance_work_mem", "max_slot_wal_keep_size")} == {
        "shared_buffers": "'512MB'",
        "work_mem": "'32MB'",
        "maintenance_work_mem": "'128MB'",
        "max_slot_wal_keep_size": "'1GB'",
    }
    assert values["password_encryption"] == "'scram-sha-256'"
    assert values["hot_standby_feedback"] == "on"
    # A client gone without a word loses its transaction and locks within about 11 s.
    assert {k: values[k] for k in values if k.startswith("tcp_keepalives")} == {
        "tcp_keepalives_idle": "5",
        "tcp_keepalives_interval": "2",
        "tcp_keepalives_count": "3",
    }
    assert not set(values) & PATRONI_OWNED
    assert not set(values) & {"primary_conninfo", "primary_slot_name", "hba_file", "unix_socket_directories"}


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_postgresql_takes_every_line_of_its_config(stack: str) -> None:
    # The server's own parser, in a second; the e2e suite also checks each line is applied in the image.
    conf = render.postgresql_conf(parse(stack, stack_config(stack)))
    assert pg_server.config_errors(conf) is None
    assert "unrecognized configuration parameter" in str(pg_server.config_errors(conf + "no_such_setting = 1\n"))


def test_every_node_archives_its_wal_to_the_backup_repository_within_the_archive_timeout() -> None:
    values = conf_values(render.postgresql_conf(settings(postgres={"archiveTimeoutSeconds": 30})))
    assert values["archive_mode"] == "on"
    assert values["archive_command"] == (
        "'pgbackrest --config=/etc/transvidio/postgres/pgbackrest.conf --config-include-path=/etc/transvidio/secrets "
        "--stanza=transvidio archive-push %p'"
    )
    assert values["archive_timeout"] == "'30s'"


def patroni(s: Any, node: Any) -> dict[str, Any]:
    return cast(dict[str, Any], yaml.safe_load(render.patroni_yml(s, node)))


def test_patroni_config_of_a_node_names_it_and_its_fixed_addresses_and_every_etcd_member() -> None:
    s = settings()
    replica = Topology(s).postgres_replicas[1]
    config = patroni(s, replica)
    assert (config["scope"], config["namespace"], config["name"]) == (
        "transvidio-prod",
        "/transvidio/",
        "postgres-replica-2",
    )
    assert config["restapi"] == {
        "listen": "0.0.0.0:8008",
        "connect_address": "10.211.1.12:8008",
        "authentication": {"username": "patroni"},
    }
    assert config["etcd3"] == {
        "hosts": ["10.211.1.60:2379", "10.211.1.61:2379", "10.211.1.62:2379"],
        "protocol": "http",
    }
    pg = config["postgresql"]
    assert (pg["listen"], pg["connect_address"]) == ("0.0.0.0:5432", "10.211.1.12:5432")
    assert pg["parameters"] == {
        "hba_file": "/etc/transvidio/postgres/pg_hba.conf",
        "ident_file": "/etc/transvidio/postgres/pg_ident.conf",
        "unix_socket_directories": "/var/lib/postgresql/run",
    }
    assert pg["authentication"] == {
        "superuser": {"username": "postgres"},
        "replication": {"username": "replicator"},
        "rewind": {"username": "rewinder"},
    }
    assert pg["custom_conf"] == "/etc/transvidio/postgres/postgresql.conf"
    assert pg["callbacks"] == {"on_start": render.PATRONI_CALLBACK, "on_role_change": render.PATRONI_CALLBACK}
    # The cluster lives on the node's volume (components/postgres.py mounts it there); the
    # passwords file Patroni writes stays off it, with the sockets.
    assert pg["data_dir"] == render.POSTGRES_DATA_DIR
    assert pg["pgpass"] == f"{render.POSTGRES_RUN_DIR}/patroni-pgpass"
    # Patroni reaches its own node, replication included, through the socket pg_hba allows.
    assert (pg["use_unix_socket"], pg["use_unix_socket_repl"]) == (True, True)
    # A new replica copies the primary at once (a fast checkpoint, not the next scheduled one),
    # and a node that cannot rewind onto the new timeline copies it again rather than stay down.
    assert (pg["create_replica_methods"], pg["basebackup"]) == (["basebackup"], [{"checkpoint": "fast"}])
    assert pg["remove_data_directory_on_rewind_failure"] is True
    assert pg["remove_data_directory_on_diverged_timelines"] is True


def test_nodes_differ_only_in_name_and_address_and_scaling_changes_no_node_config() -> None:
    def normalised(s: Any, node: Any) -> str:
        return render.patroni_yml(s, node).replace(node.hostname, "NODE").replace(str(node.data_ip), "ADDRESS")

    s = settings()
    assert len({normalised(s, node) for node in Topology(s).postgres_nodes}) == 1
    primaries = {
        render.patroni_yml(c, Topology(c).postgres_primary)
        for c in (settings(postgres={"replicas": n}) for n in range(9))
    }
    assert len(primaries) == 1  # scaling replicas never replaces (restarts) the primary
    assert len({render.postgresql_conf(settings(postgres={"replicas": n})) for n in range(9)}) == 1


@pytest.mark.parametrize(
    ("ttl", "detect"), [(20, 0), (21, 0), (30, 0), (45, 0), (300, 0), (20, 5), (20, 6), (20, 19), (21, 20), (300, 299)]
)
def test_patroni_timings_keep_its_rule_and_the_cluster_parameters_are_sized_for_every_replica(
    ttl: int, detect: int
) -> None:
    dcs = render.patroni_dcs(settings(postgres={"failoverTtlSeconds": ttl, "failoverDetectSeconds": detect}))
    assert dcs["ttl"] == ttl
    assert dcs["loop_wait"] >= 1 and dcs["retry_timeout"] >= 3
    assert dcs["loop_wait"] + 2 * dcs["retry_timeout"] <= ttl  # else Patroni adjusts them itself
    assert all(type(dcs[key]) is int for key in ("ttl", "loop_wait", "retry_timeout")), dcs
    # A replica further behind than 1 MiB of WAL never becomes primary on its own.
    assert dcs["maximum_lag_on_failover"] == 1024 * 1024
    if not detect:
        # Retries get all the time the rule leaves: a slow etcd is not a lost one.
        assert dcs["loop_wait"] + 2 * (dcs["retry_timeout"] + 1) > ttl
    if detect:
        # A primary that cannot renew its lock has demoted itself a second before the fence
        # ends it; its retries get all the rest of that time (a slow etcd is not a lost one).
        assert dcs["loop_wait"] == 1  # the lock is renewed every second: silence is seen early
        assert dcs["retry_timeout"] == min(detect - 2, (ttl - 1) // 2)
        assert dcs["loop_wait"] + dcs["retry_timeout"] <= detect - 1
    assert dcs["postgresql"]["use_pg_rewind"] is True and dcs["postgresql"]["use_slots"] is True
    assert dcs["member_slots_ttl"] == 0  # a removed replica's slot pins no WAL once it is gone
    assert dcs["postgresql"]["parameters"] == {
        "hot_standby": "on",
        "max_connections": 200,
        "max_replication_slots": 10,  # 8 replicas, plus room for a re-clone while an old slot lingers
        "max_wal_senders": 12,
        "wal_keep_size": "256MB",
        "wal_level": "replica",
        "wal_log_hints": "on",
    }
    assert set(dcs["postgresql"]["parameters"]) <= PATRONI_OWNED


def test_synchronous_means_a_synchronous_standby_and_off_means_asynchronous() -> None:
    on = render.patroni_dcs(settings(postgres={"synchronous": True}))
    off = render.patroni_dcs(settings(postgres={"synchronous": False}))
    assert (on["synchronous_mode"], on["synchronous_node_count"]) == (True, 1)
    assert off["synchronous_mode"] is False
    # The file a new primary applies is the same settings.
    assert json.loads(render.patroni_dcs_json(settings(postgres={"synchronous": True}))) == on


@pytest.mark.parametrize(
    ("target", "method", "recovery_time"),
    [
        ("", "fresh", None),
        ("latest", "restore", None),
        ("2026-11-29 10:00:00+00", "restore", "2026-11-29 10:00:00+00"),
    ],
)
def test_the_bootstrap_initialises_or_restores_to_the_configured_target(
    target: str, method: str, recovery_time: str | None
) -> None:
    s = settings(postgres={"restoreTarget": target})
    bootstrap = patroni(s, Topology(s).postgres_primary)["bootstrap"]
    assert bootstrap["method"] == method
    assert bootstrap["fresh"] == {"command": f"{render.PATRONI_BOOTSTRAP} fresh", "no_params": True}
    quoted = "'2026-11-29 10:00:00+00'" if recovery_time else "latest"
    assert bootstrap["restore"]["command"] == f"{render.PATRONI_BOOTSTRAP} restore {quoted}"
    # The script takes its own arguments only: Patroni appends none (--scope, --datadir).
    assert bootstrap["restore"]["no_params"] is True
    recovery = bootstrap["restore"]["recovery_conf"]
    assert recovery.get("recovery_target_time") == recovery_time
    assert recovery["recovery_target_action"] == "promote"
    # Along the newest timeline: a repository that saw failovers restores past them.
    assert recovery["recovery_target_timeline"] == "latest"
    assert recovery["restore_command"] == f'{render.PGBACKREST} archive-get %f "%p"'
    assert bootstrap["dcs"] == render.patroni_dcs(s)
    assert bootstrap["post_bootstrap"] == f"{render.PATRONI_CALLBACK} post_bootstrap"


def test_etcd_members_know_each_other_by_fixed_address() -> None:
    s = settings()
    members = Topology(s).etcd_nodes
    config = yaml.safe_load(render.etcd_yml(s, members[1]))
    assert config["name"] == "etcd-2"
    assert config["initial-cluster"] == (
        "etcd-1=http://10.211.1.60:2380,etcd-2=http://10.211.1.61:2380,etcd-3=http://10.211.1.62:2380"
    )
    assert config["listen-client-urls"] == "http://10.211.1.61:2379,http://127.0.0.1:2379"
    assert (config["advertise-client-urls"], config["initial-advertise-peer-urls"]) == (
        "http://10.211.1.61:2379",
        "http://10.211.1.61:2380",
    )
    assert (config["data-dir"], config["initial-cluster-state"]) == ("/var/lib/etcd", "new")
    assert config["initial-cluster-token"] == "transvidio-prod"


def test_pgbackrest_keeps_the_configured_full_backups_of_the_local_cluster() -> None:
    conf = render.pgbackrest_conf(settings(postgres={"backupRetentionFull": 3}))
    assert conf == render.HEADER + (
        "[global]\n"
        "repo1-path=/var/lib/pgbackrest\n"
        "repo1-retention-full-type=count\n"
        "repo1-retention-full=3\n"
        "compress-type=zst\n"
        "start-fast=y\n"
        "log-level-console=info\n"
        "log-level-file=off\n"
        "lock-path=/var/lib/postgresql/run/pgbackrest\n"
        "\n"
        "[transvidio]\n"
        "pg1-path=/var/lib/postgresql/data\n"
        "pg1-socket-path=/var/lib/postgresql/run\n"
        "pg1-port=5432\n"
    )


def test_primary_setup_sql_is_idempotent_and_reads_passwords_from_files() -> None:
    sql = render.primary_setup_sql()
    assert "WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'replicator')" in sql
    assert "WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'transvidio')" in sql
    assert f"`cat {render.SECRETS_DIR}/replication-password`" in sql
    # Every role's password is set on every start, the superuser's too: a rotation takes effect.
    assert f"\\set superuser_password `cat {render.SECRETS_DIR}/postgres-password`" in sql
    assert "ALTER ROLE postgres WITH PASSWORD :'superuser_password';" in sql.splitlines()


def test_rendering_is_deterministic_and_has_no_secrets() -> None:
    s = settings()
    first, second = render.rendered_files(s), render.rendered_files(s)
    assert first == second
    for text in first.values():
        assert not any(word in text for word in ("requirepass", "masterauth", "auth-pass", "PASSWORD '"))


def test_render_command_writes_every_file_of_a_stack(tmp_path: pathlib.Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "components.render", "--stack", "prod", "--out", str(tmp_path)],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        check=True,
    )
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert written == set(render.rendered_files(settings()))
    assert "redis/sentinel-3.conf" in written and "postgres/postgres-replica-2.patroni.yml" in written
    assert "postgres/etcd-3.etcd.yml" in written
    assert result.stdout.count("\n") == len(written)
    env = (tmp_path / "backend/environment").read_text()
    assert f"POSTGRES_PASSWORD_FILE={render.SECRETS_DIR}/app-db-password" in env
    # Every node in both: any node may be primary.
    nodes = "postgres-primary,postgres-replica-1,postgres-replica-2"
    assert f"POSTGRES_MASTER_HOST={nodes}\n" in env and f"POSTGRES_SLAVE_HOSTS={nodes}\n" in env


def test_render_command_reports_a_bad_setting(tmp_path: pathlib.Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "Pulumi.yaml").write_text((PROJECT_DIR / "Pulumi.yaml").read_text())
    (project / "Pulumi.bad.yaml").write_text("config:\n  transvidio:backend:\n    replicas: 99\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "components.render",
            "--stack",
            "bad",
            "--out",
            str(tmp_path / "out"),
            "--project-dir",
            str(project),
        ],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "transvidio:backend.replicas=99" in result.stderr


def conf_values(text: str) -> dict[str, str]:
    pairs = (line.split(" = ", 1) for line in text.splitlines() if " = " in line and not line.startswith("#"))
    return {key: value for key, value in pairs}


def test_the_paths_the_stack_uploads_to_are_the_ones_the_images_read() -> None:
    def image(*files: str) -> str:
        return "".join((PROJECT_DIR / "images" / f).read_text() for f in files)

    # Where each role's image reads (or creates) what the stack puts there.
    readers = {
        render.SECRETS_DIR: image("postgres/entrypoint.sh", "redis/redis-node.sh", "redis/redis-sentinel.sh"),
        render.POSTGRES_CONF_DIR: image("postgres/entrypoint.sh"),
        render.REDIS_CONF_DIR: image("redis/redis-node.sh", "redis/redis-sentinel.sh"),
        f"{render.NGINX_CONF_DIR}/nginx.conf": image("nginx/entrypoint.sh"),
        f"{render.MPI_CONF_DIR}/hostfile": image("mpi/entrypoint.sh"),
        render.UPLOADS_DIR: image("backend/Dockerfile", "mpi/Dockerfile"),
        render.OUTPUTS_DIR: image("backend/Dockerfile", "mpi/Dockerfile"),
        render.WORKSPACE_DIR: image("mpi/Dockerfile"),
    }
    for path, text in readers.items():
        assert path in text, path
    # The scripts Patroni's config names are the ones the PostgreSQL image installs.
    installed = next(
        line
        for line in image("postgres/Dockerfile").splitlines()
        if line.startswith("COPY") and "/usr/local/bin/" in line
    )
    for script in (render.PATRONI_CALLBACK, render.PATRONI_BOOTSTRAP):
        directory, name = script.rsplit("/", 1)
        assert directory == "/usr/local/bin" and name in installed.split(), script


def test_postgres_sizes_are_written_in_the_largest_unit_that_divides_them() -> None:
    values = conf_values(
        render.postgresql_conf(
            settings(postgres={"sharedBuffers": "2GB", "workMem": "1536k", "maintenanceWorkMem": "1536MB"})
        )
    )
    assert (values["shared_buffers"], values["work_mem"], values["maintenance_work_mem"]) == (
        "'2GB'",
        "'1536kB'",
        "'1536MB'",
    )


def test_known_hosts_needs_exactly_one_host_key_per_mpi_node() -> None:
    with pytest.raises(ValueError) as raised:
        render.known_hosts(settings(), ["ssh-ed25519 ONLY-ONE"])
    assert str(raised.value) == "3 MPI nodes but 1 host keys"


def test_the_backend_holds_to_the_same_body_limits_as_nginx() -> None:
    s = settings(nginx={"maxBodySize": "64MB"})
    env, conf = render.backend_environment(s), render.nginx_conf(s)
    assert env["MAX_UPLOAD_BYTES"] == str(64 * 1024 * 1024)
    assert "client_max_body_size 64m;" in block(conf, "location = /api/uploads")
    assert env["MAX_JSON_BYTES"] == str(64 * 1024)
    assert "client_max_body_size 64k;" in block(conf, "server").split("location")[0]


def test_a_missing_stack_file_is_named(tmp_path: pathlib.Path) -> None:
    (tmp_path / "Pulumi.yaml").write_text((PROJECT_DIR / "Pulumi.yaml").read_text())
    with pytest.raises(SettingsError) as raised:
        render.read_stack_file(tmp_path, "staging")
    assert str(raised.value) == f"no stack file {tmp_path / 'Pulumi.staging.yaml'}"


def test_render_sees_tls_from_the_stack_files_secure_values_and_reports_errors_whole(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "Pulumi.yaml").write_text((PROJECT_DIR / "Pulumi.yaml").read_text())
    # What `pulumi config set --secret` writes: the value encrypted, only its presence readable.
    (project / "Pulumi.tls.yaml").write_text(
        "config:\n"
        "  transvidio:nginx:\n    httpsPort: 443\n"
        "  transvidio:tlsCertificate:\n    secure: v1:AAAA\n"
        "  transvidio:tlsKey:\n    secure: v1:BBBB\n"
    )
    assert render.main(["--stack", "tls", "--out", str(tmp_path / "out"), "--project-dir", str(project)]) == 0
    assert "listen 8443 ssl;" in (tmp_path / "out/nginx/nginx.conf").read_text()
    written = capsys.readouterr().out.splitlines()
    assert sorted(written) == sorted(str(p) for p in (tmp_path / "out").rglob("*") if p.is_file())

    (project / "Pulumi.bad.yaml").write_text("config:\n  transvidio:backend:\n    replicas: 99\n")
    assert render.main(["--stack", "bad", "--out", str(tmp_path / "bad"), "--project-dir", str(project)]) == 2
    assert capsys.readouterr().err == ("error: transvidio:backend.replicas=99: must be a whole number from 1 to 20\n")
    assert not (tmp_path / "bad").exists()


# --- what limits clients -------------------------------------------------------------------------


def test_nginx_limits_each_client_and_times_out_slow_ones() -> None:
    s = settings(nginx={"requestsPerSecond": 7, "requestBurst": 9, "connectionsPerClient": 11})
    conf = render.nginx_conf(s)
    http = block(conf, "http")
    for line in (
        "limit_req_zone $binary_remote_addr zone=per_client:10m rate=7r/s;",
        "limit_conn_zone $binary_remote_addr zone=per_client_connections:10m;",
        "limit_req_status 429;",
        "limit_conn_status 429;",
        "client_header_timeout 10s;",
        "client_body_timeout 30s;",
        "send_timeout 60s;",
        "keepalive_timeout 30s;",
        "large_client_header_buffers 4 8k;",
    ):
        assert f"\n    {line}\n" in http, line
    server = block(conf, "server")
    assert "limit_conn per_client_connections 11;" in server.split("location")[0]
    # Requests to the API are rated; liveness and the internal result location are not.
    for name in ("= /api/uploads", "/api/"):
        assert "limit_req zone=per_client burst=9;" in block(conf, f"location {name}"), name
    for name in ("= /health", "= /nginx-status", render.OUTPUTS_INTERNAL_PREFIX):
        assert "limit_req" not in block(conf, f"location {name}"), name
    assert conf.count("limit_req zone=") == 2
    assert "limit_req zone=per_client;" in render.nginx_conf(settings(nginx={"requestBurst": 0}))


def test_results_are_only_served_through_the_internal_location() -> None:
    conf = render.nginx_conf(settings())
    internal = block(conf, f"location {render.OUTPUTS_INTERNAL_PREFIX}")
    assert [line.strip() for line in internal.splitlines()[1:-1]] == [
        "internal;",
        f"alias {render.OUTPUTS_DIR}/;",
        "autoindex off;",
    ]
    assert conf.count(f"alias {render.OUTPUTS_DIR}/;") == 1  # no public /outputs/
    assert "location /outputs/" not in conf
    assert block(conf, "location /").splitlines()[1].strip() == "return 404;"
    assert render.backend_environment(settings())["OUTPUTS_INTERNAL_PREFIX"] == render.OUTPUTS_INTERNAL_PREFIX
    # A URI prefix of its own: alias maps what follows it onto the outputs directory, and no
    # API route falls under it.
    prefix = render.OUTPUTS_INTERNAL_PREFIX
    assert prefix.startswith("/") and prefix.endswith("/") and not prefix.startswith("/api/"), prefix


def test_what_nginx_answers_itself_is_a_json_reason() -> None:
    conf = render.nginx_conf(settings())
    for status, reason in render.NGINX_ERRORS.items():
        assert f"error_page {status} @error_{status};" in conf
        page = block(conf, f"location @error_{status}")
        assert "default_type application/json;" in page
        assert f"return {status} '{json.dumps({'error': reason})}\\n';" in page
    assert sorted(render.NGINX_ERRORS) == [400, 403, 404, 405, 408, 413, 429, 500, 502, 504]
    # Not 503: the app's own 503 names the dependency that is down, and passes through.
    assert "proxy_intercept_errors" not in conf


def test_the_token_file_holds_each_name_with_its_tokens_hash_and_never_the_token() -> None:
    import hashlib

    text = render.api_tokens_file({"zed": "token-z", "ci": "token-c"})
    assert text == (f"ci {hashlib.sha256(b'token-c').hexdigest()}\nzed {hashlib.sha256(b'token-z').hexdigest()}\n")
    assert "token-" not in text


# --- Redis users ------------------------------------------------------------------------------------


PASSWORDS = {"app": "pa", "replica": "pr", "sentinel": "ps", "admin": "pd"}


def test_an_acl_file_turns_default_off_and_lists_each_user_by_its_passwords_hash() -> None:
    import hashlib

    text = render.redis_acl({"b": "+ping", "a": "~x:* +get"}, {"a": "secret-a", "b": "secret-b"})
    assert text.splitlines() == [
        "user default off",
        f"user a on #{hashlib.sha256(b'secret-a').hexdigest()} ~x:* +get",
        f"user b on #{hashlib.sha256(b'secret-b').hexdigest()} +ping",
    ]
    assert "secret-" not in text


def test_each_redis_user_may_do_only_its_part() -> None:
    node, sentinel = render.REDIS_NODE_ACL, render.SENTINEL_ACL
    assert sorted(node) == sorted(sentinel) == ["admin", "app", "replica", "sentinel"]
    # The application: its keys, its commands, no pub/sub.
    assert node["app"] == "~job:* resetchannels -@all +get +set +del +ping +client|setinfo"
    # Replication: no keys at all.
    assert node["replica"].startswith("resetkeys resetchannels -@all ")
    assert set(node["replica"].split()[3:]) == {"+psync", "+sync", "+replconf", "+ping"}
    # The Sentinel: what Redis's documentation lists for it, no keys.
    assert set(node["sentinel"].split()[3:]) == {
        "+multi", "+exec", "+slaveof", "+replicaof", "+ping", "+subscribe", "+publish", "+info", "+role",
        "+config|rewrite", "+client|setname", "+client|kill", "+script|kill",
    }  # fmt: skip
    assert node["sentinel"].startswith("resetkeys allchannels -@all ")
    # On the Sentinels: the app only discovers, a node asks and may request a failover.
    assert "+sentinel|failover" not in sentinel["app"] and "+sentinel|failover" in sentinel["replica"]
    assert "+@all" not in sentinel["app"] + sentinel["replica"] + node["app"] + node["replica"] + node["sentinel"]
    assert node["admin"] == "~* &* +@all" and sentinel["admin"] == sentinel["sentinel"] == "allchannels +@all"


def test_redis_nodes_and_sentinels_name_their_users_and_files() -> None:
    s = settings()
    conf = render.redis_conf(s, Topology(s).redis_nodes[1]).splitlines()
    assert f"aclfile {render.REDIS_ACL_FILE}" in conf and "masteruser replica" in conf
    assert not [line for line in conf if line.startswith(("requirepass", "masterauth", "user "))]
    sentinel = render.sentinel_conf(s, Topology(s).sentinels[0]).splitlines()
    assert "sentinel auth-user transvidio sentinel" in sentinel and "sentinel sentinel-user sentinel" in sentinel
    assert sentinel.index("sentinel auth-user transvidio sentinel") > sentinel.index(
        "sentinel monitor transvidio 10.211.1.20 6379 2"
    )


def test_a_worker_admits_only_the_masters_key_from_the_masters_address() -> None:
    s = settings()
    assert render.authorized_keys(s, "ssh-ed25519 AAAAKEY comment\n") == (
        'restrict,from="10.211.1.40" ssh-ed25519 AAAAKEY comment\n'
    )


def test_only_the_nodes_own_os_user_maps_to_the_replication_role() -> None:
    assert render.pg_ident_conf() == render.HEADER + "local-replication postgres replicator\n"


def test_pgbackrest_writes_to_an_s3_bucket_under_the_stacks_own_path() -> None:
    raw = stack_config("prod", {"postgres": {"backupRepository": "s3", "s3Endpoint": "s3.test:9443", "s3Bucket": "b01",
                                              "s3UriStyle": "path"}})  # fmt: skip
    s = parse("prod", raw, secrets_set=frozenset({"s3AccessKeyId", "s3SecretAccessKey", "s3CaCertificate"}))
    conf = render.pgbackrest_conf(s).splitlines()
    repository = [line for line in conf if line.startswith("repo1-")]
    assert repository == [
        "repo1-type=s3",
        "repo1-path=/transvidio-prod",
        "repo1-s3-bucket=b01",
        "repo1-s3-endpoint=s3.test",
        "repo1-s3-region=us-east-1",
        "repo1-s3-uri-style=path",
        "repo1-storage-port=9443",
        "repo1-storage-ca-file=/etc/transvidio/secrets/s3-ca.crt",
        "repo1-retention-full-type=count",
        "repo1-retention-full=7",
    ]
    assert not [line for line in conf if "key" in line]  # the credentials are a secret file of their own
    without_ca = parse("prod", raw, secrets_set=frozenset({"s3AccessKeyId", "s3SecretAccessKey"}))
    assert not [line for line in render.pgbackrest_conf(without_ca).splitlines() if "ca-file" in line]
    assert (
        render.pgbackrest_s3_credentials("AKIA1", "sec/ret=")
        == "[global]\nrepo1-s3-key=AKIA1\nrepo1-s3-key-secret=sec/ret=\n"
    )


def test_the_backend_reads_its_rendered_environment_as_the_stack_set_it(tmp_path: pathlib.Path) -> None:
    # Every value away from the backend's own defaults, so a name the backend does not read
    # shows as a default instead of the stack's value.
    from app.config import Config, Limits

    s = settings(
        nginx={"maxBodySize": "7MB"},
        backend={
            "maxJobSeconds": 123,
            "maxActiveJobsPerToken": 4,
            "minFreeDisk": "5MB",
            "uploadRetentionHours": 6,
            "outputRetentionHours": 9,
        },
    )
    env = render.backend_environment(s)
    for name, file in render.BACKEND_SECRET_FILES.items():
        (tmp_path / file).write_text("alice " + "0" * 64 if name == "API_TOKENS" else f"{name} value")
        env[f"{name}_FILE"] = str(tmp_path / file)
    config = Config.from_env(env)
    nodes = Topology(s).postgres_nodes
    assert config.limits == Limits(
        max_upload_bytes=7 * 1024 * 1024,
        max_json_bytes=render.API_MAX_BODY_KB * 1024,
        max_job_seconds=123,
        max_active_jobs_per_token=4,
        min_free_disk_bytes=5 * 1024 * 1024,
        upload_retention_hours=6,
        output_retention_hours=9,
    )
    assert (config.postgres_user, config.redis_user) == (topology.POSTGRES_APP_USER, topology.REDIS_APP_USER)
    assert config.postgres_slave_hosts == tuple(node.hostname for node in nodes)
    assert (config.postgres_port, config.postgres_db) == (topology.POSTGRES_PORT, topology.POSTGRES_DB)
    assert config.redis_master_name == topology.REDIS_MASTER_NAME
    assert (config.uploads_dir, config.outputs_dir) == (render.UPLOADS_DIR, render.OUTPUTS_DIR)
    assert config.outputs_internal_prefix == render.OUTPUTS_INTERNAL_PREFIX
    assert (config.postgres_password, config.redis_password) == ("POSTGRES_PASSWORD value", "REDIS_PASSWORD value")
    assert config.token_digests == {"0" * 64: "alice"}
