"""The renderers on their own: pure functions from settings to the files containers get."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
from typing import Any

import pytest

from components import render
from components.settings import Settings, SettingsError, parse
from components.topology import Topology
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
    s = parse("prod", stack_config("prod", {"nginx": {"httpsPort": https_port}}), tls_enabled=True)
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
    assert "sentinel announce-ip 10.211.1.34" in conf
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
        "replica-announce-ip 10.211.1.22",
        f"maxmemory {1024**3}",
        "maxmemory-policy allkeys-lru",
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
        "plm_ssh_args = -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=10\n"
    )


def test_pg_hba_is_exactly_these_rules_in_this_order() -> None:
    s = settings()
    rows = [line.split() for line in render.pg_hba_conf(s).splitlines() if line and not line.startswith("#")]
    # First match wins: local peer for the superuser, SCRAM from the data subnet for the two
    # roles, and nothing else from anywhere.
    assert rows == [
        ["local", "all", "postgres", "peer"],
        ["host", "replication", "replicator", "10.211.1.0/24", "scram-sha-256"],
        ["host", "transvidio", "transvidio", "10.211.1.0/24", "scram-sha-256"],
        ["host", "all", "all", "0.0.0.0/0", "reject"],
    ]


def test_postgresql_conf_replication_settings_and_replica_slot() -> None:
    s = settings()
    topo = Topology(s)
    primary = render.postgresql_conf(s, topo.postgres_primary)
    for line in (
        "wal_level = replica",
        "shared_buffers = '512MB'",
        "work_mem = '32MB'",
        "maintenance_work_mem = '128MB'",
        "max_slot_wal_keep_size = '1GB'",
        "password_encryption = 'scram-sha-256'",
    ):
        assert line in primary.splitlines()
    assert "primary_conninfo" not in primary
    replica = render.postgresql_conf(s, topo.postgres_replicas[1])
    assert "primary_slot_name = 'postgres_replica_2'" in replica
    assert "host=postgres-primary" in replica and "user=replicator" in replica


def test_every_node_archives_its_wal_to_the_backup_repository_within_the_archive_timeout() -> None:
    s = settings(postgres={"archiveTimeoutSeconds": 30})
    for node in (Topology(s).postgres_primary, Topology(s).postgres_replicas[0]):
        values = conf_values(render.postgresql_conf(s, node))
        assert values["archive_mode"] == "on"
        assert values["archive_command"] == (
            "'pgbackrest --config=/etc/transvidio/postgres/pgbackrest.conf --stanza=transvidio archive-push %p'"
        )
        assert values["archive_timeout"] == "'30s'"


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
    assert "redis/sentinel-3.conf" in written and "postgres/postgres-replica-2.conf" in written
    assert result.stdout.count("\n") == len(written)
    env = (tmp_path / "backend/environment").read_text()
    assert f"POSTGRES_PASSWORD_FILE={render.SECRETS_DIR}/app-db-password" in env
    assert "POSTGRES_SLAVE_HOSTS=postgres-replica-1,postgres-replica-2" in env


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


def test_the_primary_config_does_not_change_with_the_replica_count() -> None:
    confs = {
        render.postgresql_conf(s, Topology(s).postgres_primary)
        for s in (settings(postgres={"replicas": count}) for count in range(0, 9))
    }
    assert len(confs) == 1  # scaling replicas never replaces (restarts) the primary
    values = conf_values(confs.pop())
    # Sized once for the most replicas a stack may have, plus room for re-bootstraps.
    assert (values["max_replication_slots"], values["max_wal_senders"]) == ("10", "12")
    assert values["listen_addresses"] == "'*'" and values["port"] == "5432"
    # The healthchecks and the entrypoint connect through this socket directory and hba file.
    assert values["unix_socket_directories"] == "'/var/lib/postgresql/run'"
    assert values["hba_file"] == f"'{render.POSTGRES_CONF_DIR}/pg_hba.conf'"
    assert (values["hot_standby"], values["hot_standby_feedback"]) == ("on", "on")


def test_a_replica_config_is_the_primary_s_plus_its_standby_settings() -> None:
    s = settings()
    topo = Topology(s)
    primary = conf_values(render.postgresql_conf(s, topo.postgres_primary))
    replica = conf_values(render.postgresql_conf(s, topo.postgres_replicas[0]))
    assert {k: v for k, v in replica.items() if k in primary} == primary
    assert set(replica) - set(primary) == {"primary_conninfo", "primary_slot_name"}
    assert replica["primary_conninfo"] == (
        "'host=postgres-primary port=5432 user=replicator application_name=postgres_replica_1 "
        "passfile=/var/lib/postgresql/run/pgpass'"
    )


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


def test_postgres_sizes_are_written_in_the_largest_unit_that_divides_them() -> None:
    values = conf_values(
        render.postgresql_conf(
            settings(postgres={"sharedBuffers": "2GB", "workMem": "1536k", "maintenanceWorkMem": "1536MB"}),
            Topology(settings()).postgres_primary,
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
