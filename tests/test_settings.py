"""Settings: every bad value stops the program with a message naming key, value and rule."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any

import pytest
import yaml

from components import settings as cfg
from tests.program import PROJECT_DIR, FakeMocks, evaluate, stack_config


def parse_stack(stack: str, overrides: dict[str, Any] | None = None, tls: bool = False) -> cfg.Settings:
    return cfg.parse(stack, stack_config(stack, overrides), secrets_set=cfg.TLS_SECRETS if tls else frozenset())


def test_both_stacks_parse_to_the_documented_shapes() -> None:
    dev, prod = parse_stack("dev"), parse_stack("prod")
    assert (dev.backend.replica_count, dev.postgres.replica_count, dev.redis.replica_count) == (1, 1, 1)
    assert (dev.redis.sentinel_count, dev.redis.quorum, dev.mpi.worker_count) == (1, 1, 1)
    assert (prod.backend.replica_count, prod.postgres.replica_count, prod.redis.replica_count) == (3, 2, 2)
    assert (prod.redis.sentinel_count, prod.redis.quorum, prod.mpi.worker_count) == (3, 2, 2)
    assert dev.network.publish_host_ip == "127.0.0.1"
    assert prod.postgres.publish_port is None and prod.redis.publish_port is None


def test_prod_defaults_are_the_seed_guides_tuning() -> None:
    prod = parse_stack("prod")
    assert prod.postgres.shared_buffers == 512 * 1024**2
    assert prod.postgres.work_mem == 32 * 1024**2
    assert prod.postgres.maintenance_work_mem == 128 * 1024**2
    assert prod.redis.maxmemory == 1024**3
    assert (prod.nginx.worker_processes, prod.nginx.worker_connections) == ("4", 2048)


def test_pulumi_yaml_declares_exactly_the_settings_defaults() -> None:
    project = yaml.safe_load((PROJECT_DIR / "Pulumi.yaml").read_text())
    assert project["name"] == "transvidio"
    assert project["runtime"]["name"] == "python"
    assert project["runtime"]["options"]["virtualenv"] == ".venv"
    for section in cfg.SECTIONS:
        declared = project["config"][section]
        assert declared["description"]
        assert declared["default"] == cfg.defaults(section), section


def test_every_setting_has_a_default_that_parses() -> None:
    for section, cls in cfg.SECTIONS.items():
        for spec in dataclasses.fields(cls):
            spec.metadata["parse"](f"{section}.{spec.metadata['key']}", spec.metadata["default"])


ERRORS = [
    ("dev", {"backend": {"replicas": 0}}, "transvidio:backend.replicas=0: must be a whole number from 1 to 20"),
    ("dev", {"backend": {"replicas": 21}}, "transvidio:backend.replicas=21: must be a whole number from 1 to 20"),
    (
        "dev",
        {"postgres": {"replicas": "two"}},
        "transvidio:postgres.replicas='two': must be a whole number from 0 to 8",
    ),
    ("dev", {"mpi": {"workers": True}}, "transvidio:mpi.workers=True: must be a whole number from 1 to 16"),
    (
        "dev",
        {"redis": {"sentinels": 1, "quorum": 2}},
        "transvidio:redis.sentinels=1 with quorum 2: the quorum must be between 1 and the number of Sentinels",
    ),
    (
        "prod",
        {"redis": {"sentinels": 2, "quorum": 2}},
        "transvidio:redis.sentinels=2 on stack prod: production needs at least 3 Sentinels (a failover needs a majority of them; fewer cannot survive losing one)",
    ),
    (
        "prod",
        {"postgres": {"consensusNodes": 1}},
        "transvidio:postgres.consensusNodes=1 on stack prod: production needs at least 3 (with one etcd node, losing it stops every PostgreSQL failover)",
    ),
    (
        "dev",
        {"redis": {"publishPort": 5432}},
        "transvidio:redis.publishPort publishes host port 5432, already published by transvidio:postgres.publishPort: every published port must be distinct",
    ),
    (
        "dev",
        {"nginx": {"httpPort": 26379}},
        "transvidio:redis.sentinelPublishPort publishes host port 26379, already published by transvidio:nginx.httpPort: every published port must be distinct",
    ),
    (
        "dev",
        {"postgres": {"memory": "lots"}},
        "transvidio:postgres.memory='lots': must be a size such as 256MB, 1GB or 512m",
    ),
    (
        "dev",
        {"redis": {"maxmemory": "1 zettabyte"}},
        "transvidio:redis.maxmemory='1 zettabyte': must be a size such as 256MB, 1GB or 512m",
    ),
    ("dev", {"postgres": {"memory": "16MB"}}, "transvidio:postgres.memory='16MB': must be at least 128MB"),
    (
        "dev",
        {"images": {"base": "Debian:Trixie!"}},
        "transvidio:images.base='Debian:Trixie!': must be an image reference such as debian:trixie-slim",
    ),
    (
        "dev",
        {"images": {"backend": "UPPER/case"}},
        "transvidio:images.backend='UPPER/case': must be an image reference such as debian:trixie-slim",
    ),
    (
        "dev",
        {"network": {"dataSubnet": "10.210.1.0/26"}},
        "transvidio:network.dataSubnet='10.210.1.0/26': holds host offsets 1-62, but backend needs offset 100: use a /25 or larger",
    ),
    (
        "dev",
        {"network": {"dataSubnet": "10.210.1.0/33"}},
        "transvidio:network.dataSubnet='10.210.1.0/33': must be an IPv4 subnet in CIDR form such as 10.210.1.0/24",
    ),
    (
        "dev",
        {"network": {"dataSubnet": "8.8.8.0/24"}},
        "transvidio:network.dataSubnet='8.8.8.0/24': must be a private subnet (10/8, 172.16/12 or 192.168/16)",
    ),
    (
        "dev",
        {"network": {"dataSubnet": "10.210.0.0/16"}},
        "transvidio:network.dataSubnet='10.210.0.0/16': overlaps network.edgeSubnet=10.210.0.0/24",
    ),
    (
        "dev",
        {"redis": {"sentinals": 3}},
        "transvidio:redis.sentinals is not a setting of redis; allowed keys: backupIntervalMinutes, backupRetention, cpus, downAfterMs, failoverTimeoutMs, maxmemory, maxmemoryPolicy, memory, minReplicasMaxLag, minReplicasToWrite, publishPort, quorum, replicas, restoreFrom, sentinelCpus, sentinelMemory, sentinelPublishPort, sentinels",
    ),
    (
        "dev",
        {"postgress": {"replicas": 1}},
        "transvidio:postgress is not a setting; allowed keys: appDbPassword, backend, deploy, images, mpi, network, nginx, patroniApiPassword, postgres, postgresPassword, redis, redisAdminPassword, redisPassword, redisReplicationPassword, redisSentinelPassword, replicationPassword, rewindPassword, s3AccessKeyId, s3CaCertificate, s3SecretAccessKey, secretKey, tlsCertificate, tlsKey",
    ),
    (
        "dev",
        {"redis": "three"},
        "transvidio:redis='three': must be an object, e.g. `pulumi config set --path redis.<key> VALUE`",
    ),
    (
        "dev",
        {"redis": {"minReplicasToWrite": 1}},
        "transvidio:redis.minReplicasToWrite=1 with 1 replicas: must be at most 0 (redis.replicas - 1), or the master a failover promotes refuses every write while the old master is down",
    ),
    (
        "dev",
        {"redis": {"maxmemoryPolicy": "random"}},
        "transvidio:redis.maxmemoryPolicy='random': must be one of noeviction, allkeys-lru, allkeys-lfu, volatile-lru, volatile-lfu, volatile-ttl",
    ),
    (
        "dev",
        {"network": {"dataInternal": True}},
        "transvidio:postgres.publishPort publishes a port while network.dataInternal=true: an internal network has no published ports; set network.dataInternal=false (dev only) or the port to 0",
    ),
    (
        "prod",
        {"network": {"dataInternal": False}, "postgres": {"publishPort": 5432}},
        "transvidio:postgres.publishPort is set on stack prod: production publishes only nginx; set it to 0",
    ),
    (
        "prod",
        {"nginx": {"httpsPort": 443}},
        "transvidio:nginx.httpsPort=443 needs the secrets tlsCertificate and tlsKey (`pulumi config set --secret tlsCertificate < cert.pem`)",
    ),
    (
        "dev",
        {"network": {"publishHostIp": "localhost"}},
        "transvidio:network.publishHostIp='localhost': must be an IPv4 address such as 127.0.0.1 or 0.0.0.0",
    ),
    (
        "dev",
        {"nginx": {"workerProcesses": "many"}},
        "transvidio:nginx.workerProcesses='many': must be a whole number from 1 to 64",
    ),
    (
        "dev",
        {"redis": {"publishPort": 65535}},
        "transvidio:redis.publishPort=65535: needs 2 ports from there, past 65535",
    ),
    (
        "prod",
        {"postgres": {"backupFullIntervalMinutes": 60, "backupIncrementalIntervalMinutes": 60}},
        "transvidio:postgres.backupIncrementalIntervalMinutes=60 with postgres.backupFullIntervalMinutes=60: incremental backups must come more often than full ones (or set 0 for none)",
    ),
    (
        "prod",
        {"postgres": {"failoverDetectSeconds": 4}},
        "transvidio:postgres.failoverDetectSeconds=4 with postgres.failoverTtlSeconds=20: must be 0 (wait for the TTL) or from 5 (a primary's loop and its 3 s retry, plus a second) to one less than the TTL",
    ),
    (
        "prod",
        {"postgres": {"failoverDetectSeconds": 30, "failoverTtlSeconds": 30}},
        "transvidio:postgres.failoverDetectSeconds=30 with postgres.failoverTtlSeconds=30: must be 0 (wait for the TTL) or from 5 (a primary's loop and its 3 s retry, plus a second) to one less than the TTL",
    ),
    (
        "prod",
        {"postgres": {"restoreTarget": "yesterday"}},
        "transvidio:postgres.restoreTarget='yesterday': must be empty, latest, or a time with its UTC offset such as '2026-11-29 14:05:00+00'",
    ),
]


@pytest.mark.parametrize(("stack", "overrides", "message"), ERRORS, ids=[e[2].split(":")[1][:40] for e in ERRORS])
def test_bad_value_is_named_with_what_is_allowed(stack: str, overrides: dict[str, Any], message: str) -> None:
    # The whole message: the key and the value first, then what is allowed, word for word.
    with pytest.raises(cfg.SettingsError) as raised:
        parse_stack(stack, overrides)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("", ""),
        (None, ""),
        ("latest", "latest"),
        ("2026-11-29 14:05:00+00", "2026-11-29 14:05:00+00"),
        ("2026-11-29 14:05:00.123456-05:30", "2026-11-29 14:05:00.123456-05:30"),
    ],
)
def test_a_restore_target_is_latest_or_a_time_with_its_offset(value: Any, parsed: str) -> None:
    assert cfg.restore_target("k", value) == parsed


@pytest.mark.parametrize(
    "value", ["now", "2026-11-29 14:05:00", "2026-11-29T14:05:00+00", "2026-13-01 00:00:00+00", "2026-11-29", 7]
)
def test_a_restore_target_without_an_offset_or_not_a_time_is_refused(value: Any) -> None:
    refused(
        cfg.restore_target,
        value,
        "must be empty, latest, or a time with its UTC offset such as '2026-11-29 14:05:00+00'",
    )


def test_incremental_backups_may_be_off() -> None:
    settings = parse_stack("prod", {"postgres": {"backupIncrementalIntervalMinutes": 0}})
    assert settings.postgres.backup_incremental_interval_minutes == 0


def test_the_postgres_nodes_publish_one_port_each_from_publish_port() -> None:
    # dev: the primary and one replica, so two ports: the range may end at 65535...
    assert parse_stack("dev", {"postgres": {"publishPort": 65534}}).postgres.publish_port == 65534
    # ...and its second port is taken: Redis node 0 cannot have it.
    with pytest.raises(cfg.SettingsError) as raised:
        parse_stack("dev", {"postgres": {"publishPort": 6378}})
    assert str(raised.value) == (
        "transvidio:redis.publishPort publishes host port 6379, already published by "
        "transvidio:postgres.publishPort: every published port must be distinct"
    )


def test_published_ports_may_end_exactly_at_65535() -> None:
    # Two Redis nodes from 65534 use 65534 and 65535: the last port there is.
    assert parse_stack("dev", {"redis": {"publishPort": 65534}}).redis.publish_port == 65534


class CountingMocks(FakeMocks):
    """FakeMocks that remember every resource the program registered."""

    def __init__(self) -> None:
        self.created: list[str] = []

    def new_resource(self, args: Any) -> Any:
        self.created.append(args.name)
        return super().new_resource(args)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"redis": {"sentinels": 1, "quorum": 2}}, r"transvidio:redis\.sentinels=1 with quorum 2"),
        ({"postgres": {"memory": "lots"}}, r"transvidio:postgres\.memory"),
    ],
)
def test_a_bad_value_stops_the_program_before_any_resource_is_registered(
    overrides: dict[str, Any], message: str
) -> None:
    mocks = CountingMocks()
    with pytest.raises(Exception, match=message):
        evaluate("dev", overrides, mocks=mocks)
    assert mocks.created == []
    # The same mocks register the whole stack once the value is valid: the count above is live.
    evaluate("dev", mocks=mocks)
    assert len(mocks.created) > 20


PASSWORD_RULE = (
    "must be 16 to 128 characters from A-Z a-z 0-9 . _ ~ - (it goes into a pgpass file, server configs and URLs)"
)


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("redisPassword", "short-one", PASSWORD_RULE),
        ("postgresPassword", "has:a-colon-in-it-xx", PASSWORD_RULE),
        ("appDbPassword", "line-one\nrequirepass x", PASSWORD_RULE),
        ("replicationPassword", "user@host/path?query", PASSWORD_RULE),
        ("redisPassword", "x" * 129, PASSWORD_RULE),
        ("secretKey", "a key with spaces in it, thirty-two+", "must be 32 to 256 printable characters, no spaces"),
        ("secretKey", "too-short", "must be 32 to 256 printable characters, no spaces"),
        ("tlsCertificate", "a certificate", "must be PEM text (-----BEGIN CERTIFICATE-----)"),
        ("tlsKey", "a key", "must be PEM text (PRIVATE KEY-----)"),
    ],
)
def test_a_secret_that_would_break_a_file_or_a_url_is_refused_naming_the_key_not_the_value(
    key: str, value: str, allowed: str
) -> None:
    with pytest.raises(cfg.SettingsError) as raised:
        cfg.check_secret(key, value)
    assert str(raised.value) == f"transvidio:{key} (secret, value not shown): {allowed}"
    assert value not in str(raised.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("redisPassword", "A" * 16),
        ("postgresPassword", "Az09._~-" * 16),
        ("secretKey", "!#$%&()*+,-./:;<=>?@[]^_`{|}~" + "x" * 3),
        ("tlsKey", "-----BEGIN EC PRIVATE KEY-----\n...\n-----END EC PRIVATE KEY-----\n"),
    ],
)
def test_a_sound_secret_is_accepted(key: str, value: str) -> None:
    cfg.check_secret(key, value)


def test_a_bad_secret_override_stops_the_program_before_any_resource_is_registered() -> None:
    mocks = CountingMocks()
    with pytest.raises(Exception, match="transvidio:redisPassword"):
        evaluate("dev", mocks=mocks, secret_config={"redisPassword": "has:colon-and-more-chars"})
    assert mocks.created == []


def test_a_certificate_without_an_https_port_is_refused() -> None:
    # It used to render `listen ... ssl` with no certificate uploaded: nginx never started.
    with pytest.raises(cfg.SettingsError) as raised:
        parse_stack("prod", tls=True)
    assert str(raised.value) == (
        "transvidio:nginx.httpsPort=0 with the secrets tlsCertificate and tlsKey set: nginx would have a "
        "certificate and no port to serve it on; set nginx.httpsPort (e.g. 443), or remove the secrets"
    )


def test_https_port_is_accepted_with_a_certificate_and_key() -> None:
    settings = parse_stack("prod", {"nginx": {"httpsPort": 443}}, tls=True)
    assert settings.nginx.https_port == 443


def readme_cell(value: Any) -> str:
    """How the README's configuration table writes a value (booleans as YAML spells them)."""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, tuple)):
        return f"`{json.dumps(list(value))}`"
    return "`''`" if value == "" else f"`{value}`"


def test_readme_config_table_matches_the_code_and_both_stack_files_value_by_value() -> None:
    readme = (PROJECT_DIR / "README.md").read_text()
    # The configuration reference only: other tables (the benchmarks') have rows of five cells too.
    reference = readme.split("\n## Configuration reference\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in reference.splitlines() if line.startswith("| `") and line.count("|") == 6]
    documented = {cells[0]: cells[1:] for cells in ([c.strip() for c in row.strip("|").split("|")] for row in rows)}
    stacks = {stack: stack_config(stack) for stack in ("dev", "prod")}
    expected = {}
    for section, cls in cfg.SECTIONS.items():
        for spec in dataclasses.fields(cls):
            key = spec.metadata["key"]
            expected[f"`{section}.{key}`"] = [
                readme_cell(spec.metadata["default"]),
                *(readme_cell(stacks[stack][section].get(key, spec.metadata["default"])) for stack in ("dev", "prod")),
                spec.metadata["doc"],
            ]
    assert documented == expected
    for key in cfg.SECRET_KEYS:
        assert f"`{key}`" in readme, key


# --- each value parser, at its edges -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("7", 7),
        ("7b", 7),
        ("64k", 64 * 1024),
        ("64KB", 64 * 1024),
        ("256m", 256 * 1024**2),
        ("512MB", 512 * 1024**2),
        ("1gb", 1024**3),
        ("1G", 1024**3),
        ("2TB", 2 * 1024**4),
        (" 3 GB ", 3 * 1024**3),
        (1024, 1024),
    ],
)
def test_sizes_parse_in_binary_units(text: Any, size: int) -> None:
    assert cfg.size_bytes("k", text) == size


def refused(parser: cfg.Parser, value: Any, allowed: str) -> None:
    """The parser refuses `value` with exactly the message naming key, value and rule."""
    with pytest.raises(cfg.SettingsError) as raised:
        parser("k", value)
    assert str(raised.value) == f"transvidio:k={value!r}: {allowed}"


@pytest.mark.parametrize("text", ["0", "0MB", "-1MB", "1.5GB", "1PB", "MB", "", "1 G B", None])
def test_bad_sizes_are_refused(text: Any) -> None:
    refused(cfg.size_bytes, text, "must be a size such as 256MB, 1GB or 512m")


def test_megabytes_round_down_and_hold_the_minimum() -> None:
    parse = cfg.megabytes(64)
    assert parse("k", "64MB") == 64 and parse("k", "1GB") == 1024 and parse("k", "65m") == 65
    assert parse("k", str(64 * 1024**2 + 1)) == 64
    refused(parse, "63MB", "must be at least 64MB")


def test_integers_are_whole_and_inside_their_bounds_inclusive() -> None:
    parse = cfg.integer(1, 3)
    assert [parse("k", v) for v in (1, "2", 3)] == [1, 2, 3]
    for bad in (0, 4, "x", 1.5, True, None, "2.0"):
        refused(parse, bad, "must be a whole number from 1 to 3")


def test_ports_zero_or_empty_mean_unpublished() -> None:
    assert [cfg.optional_port("k", v) for v in (None, 0, "0", "")] == [None] * 4
    assert cfg.optional_port("k", 1) == 1 and cfg.optional_port("k", "65535") == 65535
    for bad in (65536, -1, "http"):
        refused(cfg.optional_port, bad, "must be a whole number from 1 to 65535")


def test_booleans_take_yaml_and_strings_only() -> None:
    assert [cfg.boolean("k", v) for v in (True, False, "true", "False", "TRUE")] == [True, False, True, False, True]
    for bad in ("yes", 1, 0, None):
        refused(cfg.boolean, bad, "must be true or false")


def test_choices_and_worker_processes() -> None:
    assert cfg.choice("a", "b")("k", "b") == "b"
    refused(cfg.choice("a", "b"), "c", "must be one of a, b")
    assert cfg.worker_processes("k", "auto") == "auto" and cfg.worker_processes("k", 64) == "64"
    for bad in (0, 65, "many"):
        refused(cfg.worker_processes, bad, "must be a whole number from 1 to 64")


@pytest.mark.parametrize(
    "reference",
    [
        "debian:trixie-slim",
        "registry.example.com:5000/team/backend:1.2.3",
        "backend",
        "my_org/my-app__x:latest",
        "backend@sha256:" + "a" * 64,
    ],
)
def test_image_references_that_docker_accepts(reference: str) -> None:
    assert cfg.image_reference("k", reference) == reference
    assert cfg.optional_image_reference("k", reference) == reference


@pytest.mark.parametrize("reference", ["Debian:trixie", "a b", ":tag", "x:", "x@sha256:abc", 5, "-x"])
def test_image_references_docker_refuses(reference: Any) -> None:
    refused(cfg.image_reference, reference, "must be an image reference such as debian:trixie-slim")


def test_optional_image_reference_empty_means_build() -> None:
    assert cfg.optional_image_reference("k", "") is None and cfg.optional_image_reference("k", None) is None


def test_subnets_are_private_cidrs_and_addresses_ipv4() -> None:
    assert str(cfg.subnet("k", "10.0.0.0/24")) == "10.0.0.0/24"
    assert str(cfg.subnet("k", "192.168.4.0/25")) == "192.168.4.0/25"
    refused(cfg.subnet, "10.0.0.1/24", "must be an IPv4 subnet in CIDR form such as 10.210.1.0/24")  # host bits
    refused(cfg.subnet, "8.8.8.0/24", "must be a private subnet (10/8, 172.16/12 or 192.168/16)")
    assert cfg.ip_address("k", "0.0.0.0") == "0.0.0.0"
    refused(cfg.ip_address, "::1", "must be an IPv4 address such as 127.0.0.1 or 0.0.0.0")


# The range users may set, per key: the lowest and highest accepted values. Changing a
# limit is a decision, so it changes here too.
INTEGER_BOUNDS = {
    "postgres.replicas": (0, 8),
    "postgres.backupFullIntervalMinutes": (1, 44640),
    "postgres.backupIncrementalIntervalMinutes": (0, 44640),
    "postgres.backupRetentionFull": (1, 365),
    "postgres.failoverTtlSeconds": (20, 300),
    "postgres.failoverDetectSeconds": (0, 299),
    "postgres.archiveTimeoutSeconds": (10, 3600),
    "redis.replicas": (1, 8),
    "redis.sentinels": (1, 7),
    "redis.quorum": (1, 7),
    "redis.downAfterMs": (500, 600000),
    "redis.failoverTimeoutMs": (1000, 3600000),
    "redis.minReplicasToWrite": (0, 8),
    "redis.minReplicasMaxLag": (1, 3600),
    "redis.backupIntervalMinutes": (0, 44640),
    "redis.backupRetention": (1, 1000),
    "mpi.workers": (1, 16),
    "mpi.slotsPerNode": (1, 64),
    "backend.replicas": (1, 20),
    "backend.maxJobSeconds": (1, 86400),
    "backend.maxActiveJobsPerToken": (1, 10000),
    "backend.uploadRetentionHours": (1, 87600),
    "backend.outputRetentionHours": (1, 87600),
    "nginx.workerConnections": (64, 65535),
    "nginx.httpPort": (1, 65535),
    "nginx.requestsPerSecond": (1, 100000),
    "nginx.requestBurst": (0, 100000),
    "nginx.connectionsPerClient": (1, 65535),  # nginx's limit_conn refuses 65536 and more
}
MEMORY_MINIMUMS_MB = {
    "postgres.memory": 128,
    "postgres.shmSize": 64,
    "redis.memory": 64,
    "redis.sentinelMemory": 32,
    "mpi.memory": 128,
    "backend.memory": 128,
    "nginx.memory": 32,
    "nginx.maxBodySize": 1,
}


def field_parser(dotted: str) -> cfg.Parser:
    section, key = dotted.split(".")
    spec = next(f for f in dataclasses.fields(cfg.SECTIONS[section]) if f.metadata["key"] == key)
    parser: cfg.Parser = spec.metadata["parse"]
    return parser


@pytest.mark.parametrize(("dotted", "bounds"), INTEGER_BOUNDS.items(), ids=list(INTEGER_BOUNDS))
def test_each_count_and_timing_accepts_exactly_its_range(dotted: str, bounds: tuple[int, int]) -> None:
    low, high = bounds
    parse = field_parser(dotted)
    assert (parse(dotted, low), parse(dotted, high)) == (low, high)
    for outside in (low - 1, high + 1):
        with pytest.raises(cfg.SettingsError, match=f"must be a whole number from {low} to {high}$"):
            parse(dotted, outside)


# Whole numbers with more to them than a range, each with its own rule: 0 or null for no port,
# "auto", odd counts only.
NOT_ONLY_A_RANGE = {
    "postgres.publishPort",
    "redis.publishPort",
    "redis.sentinelPublishPort",
    "nginx.httpsPort",
    "nginx.workerProcesses",
    "postgres.consensusNodes",
}


def test_every_whole_number_setting_has_its_range_above() -> None:
    # Found by what the parser says of a word: a new count or timing cannot go unbounded-tested.
    whole_numbers = set()
    for section, cls in cfg.SECTIONS.items():
        for spec in dataclasses.fields(cls):
            dotted = f"{section}.{spec.metadata['key']}"
            try:
                spec.metadata["parse"](dotted, "many")
            except cfg.SettingsError as error:
                if "must be a whole number from" in str(error):
                    whole_numbers.add(dotted)
    assert sorted(whole_numbers - NOT_ONLY_A_RANGE) == sorted(INTEGER_BOUNDS)


@pytest.mark.parametrize(("dotted", "minimum"), MEMORY_MINIMUMS_MB.items(), ids=list(MEMORY_MINIMUMS_MB))
def test_each_memory_setting_has_its_minimum(dotted: str, minimum: int) -> None:
    parse = field_parser(dotted)
    assert parse(dotted, f"{minimum}MB") == minimum
    with pytest.raises(cfg.SettingsError, match=f"must be at least {minimum}MB$"):
        parse(dotted, f"{minimum * 1024 - 1}k")


def largest_accepted(dotted: str) -> int:
    """The largest whole number up to 100 that the setting's parser accepts."""
    parse = field_parser(dotted)
    accepted: list[int] = []
    for number in range(101):
        with contextlib.suppress(cfg.SettingsError):
            accepted.append(parse(dotted, number))
    return max(accepted)


def test_every_count_fills_at_most_its_address_block() -> None:
    # The largest count of each role is exactly what its fixed address block holds; nginx and
    # the Redis backup job are one container at most.
    sizes = {
        "postgres": 1 + INTEGER_BOUNDS["postgres.replicas"][1],
        "etcd": largest_accepted("postgres.consensusNodes"),
        "redis": 1 + INTEGER_BOUNDS["redis.replicas"][1],
        "redis-backup": 1,
        "sentinel": INTEGER_BOUNDS["redis.sentinels"][1],
        "mpi": 1 + INTEGER_BOUNDS["mpi.workers"][1],
        "nginx": 1,
        "backend": INTEGER_BOUNDS["backend.replicas"][1],
    }
    assert {role: cfg.ADDRESS_BLOCKS[role][1] for role in cfg.ADDRESS_BLOCKS} == sizes


def test_no_two_address_blocks_share_an_offset_and_none_takes_the_gateway() -> None:
    owners: dict[int, str] = {}
    for role, (first, size) in cfg.ADDRESS_BLOCKS.items():
        for offset in range(first, first + size):
            assert offset not in owners, f"offset {offset} is in the blocks of {owners.get(offset)} and {role}"
            owners[offset] = role
    assert min(owners) > 1


def test_eviction_policies_are_redis_s() -> None:
    parse = field_parser("redis.maxmemoryPolicy")
    policies = ["noeviction", "allkeys-lru", "allkeys-lfu", "volatile-lru", "volatile-lfu", "volatile-ttl"]
    assert [parse("p", p) for p in policies] == policies
    refused(parse, "allkeys-random-ish", "must be one of " + ", ".join(policies))


@pytest.mark.parametrize(
    ("text", "millicpus"), [("0.1", 100), ("0.25", 250), (0.5, 500), (1, 1000), ("2.5", 2500), ("64", 64000)]
)
def test_a_cpu_limit_is_a_number_of_cpus_with_at_most_two_decimals(text: Any, millicpus: int) -> None:
    assert field_parser("postgres.cpus")("postgres.cpus", text) == millicpus


@pytest.mark.parametrize("bad", ["0.09", "0", "64.01", "65", "1.234", "-1", "one", True, None, "1e1"])
def test_a_cpu_limit_outside_its_range_or_form_is_refused(bad: Any) -> None:
    refused(
        field_parser("backend.cpus"),
        bad,
        "must be a number of CPUs from 0.1 to 64, at most two decimals, such as 0.5 or 2",
    )


def test_a_cpu_limit_the_provider_reads_back_rounded_is_refused_naming_the_one_that_works() -> None:
    refused(
        field_parser("mpi.cpus"), "10.05", "is read back by the Docker provider as 10.1: use 10.1 (or another value)"
    )


@pytest.mark.parametrize(
    "bad",
    [[], "default", ["Default"], ["a", "a"], ["1st"], ["x" * 33], [f"t{i}" for i in range(9)], [7], ["has space"]],
)
def test_token_names_are_one_to_eight_distinct_lower_case_names(bad: Any) -> None:
    refused(
        field_parser("backend.apiTokens"),
        bad,
        "must be a list of 1 to 8 distinct names of lower-case letters, digits and '-', starting with a letter, "
        'such as ["default"]',
    )
    assert field_parser("backend.apiTokens")("k", ["ci", "alice-2", "x" * 32]) == ("ci", "alice-2", "x" * 32)


@pytest.mark.parametrize("good", ["", "latest", "redis-20261201T120000Z.rdb"])
def test_a_redis_restore_names_latest_or_a_backup(good: str) -> None:
    assert field_parser("redis.restoreFrom")("k", good) == good


@pytest.mark.parametrize(
    "bad", ["newest", "redis-2026.rdb", "../redis-20261201T120000Z.rdb", "redis-20261201T120000Z.rdb\n"]
)
def test_a_redis_restore_from_anything_else_is_refused(bad: str) -> None:
    refused(
        field_parser("redis.restoreFrom"),
        bad,
        "must be empty, latest, or a backup's name such as redis-20261201T120000Z.rdb",
    )


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("images.base", "debian:trixie-slim\n"),
        ("backend.apiTokens", ["default\n"]),
    ],
)
def test_a_value_with_a_trailing_newline_is_refused(dotted: str, value: Any) -> None:
    with pytest.raises(cfg.SettingsError):
        field_parser(dotted)(dotted, value)


@pytest.mark.parametrize("key", ["redisPassword", "secretKey"])
def test_a_secret_with_a_trailing_newline_is_refused(key: str) -> None:
    # `pulumi config set --secret KEY < file` keeps the file's newline: it would end up in
    # pgpass lines, ACL hashes and URLs.
    with pytest.raises(cfg.SettingsError, match=f"transvidio:{key} \\(secret, value not shown\\)"):
        cfg.check_secret(key, "A" * 40 + "\n")


S3 = {"postgres": {"backupRepository": "s3", "s3Endpoint": "s3.test:9443", "s3Bucket": "backups"}}
S3_KEYS = frozenset({"s3AccessKeyId", "s3SecretAccessKey"})


def test_an_s3_repository_needs_its_endpoint_bucket_and_credentials() -> None:
    settings = cfg.parse("prod", stack_config("prod", S3), secrets_set=S3_KEYS)
    assert (settings.postgres.s3_endpoint, settings.postgres.s3_bucket) == ("s3.test:9443", "backups")
    for missing, message in (
        ("s3Endpoint", "transvidio:postgres.s3Endpoint is empty with postgres.backupRepository=s3: set the S3 "
                       "endpoint (host or host:port) backups go to"),
        ("s3Bucket", "transvidio:postgres.s3Bucket is empty with postgres.backupRepository=s3: set the S3 bucket "
                     "backups go to"),
    ):  # fmt: skip
        with pytest.raises(cfg.SettingsError) as raised:
            cfg.parse("prod", stack_config("prod", {"postgres": {**S3["postgres"], missing: ""}}), secrets_set=S3_KEYS)
        assert str(raised.value) == message
    for secret in sorted(S3_KEYS):
        with pytest.raises(cfg.SettingsError) as raised:
            cfg.parse("prod", stack_config("prod", S3), secrets_set=S3_KEYS - {secret})
        assert str(raised.value) == (
            f"transvidio:postgres.backupRepository=s3 needs the secret {secret} (`pulumi config set --secret {secret} ...`)"
        )
    # A volume repository needs none of them.
    assert cfg.parse("prod", stack_config("prod")).postgres.backup_repository == "volume"


def test_the_egress_network_must_not_overlap_the_others() -> None:
    with pytest.raises(cfg.SettingsError) as raised:
        cfg.parse(
            "prod", stack_config("prod", {**S3, "network": {"egressSubnet": "10.211.1.0/25"}}), secrets_set=S3_KEYS
        )
    assert str(raised.value) == (
        "transvidio:network.egressSubnet='10.211.1.0/25': overlaps network.edgeSubnet=10.211.0.0/24 or "
        "network.dataSubnet=10.211.1.0/24"
    )


@pytest.mark.parametrize(
    ("dotted", "bad", "allowed"),
    [
        ("postgres.s3Endpoint", "https://s3.test", "must be a host name or address, optionally with :port, such as s3.eu-west-1.amazonaws.com"),
        ("postgres.s3Endpoint", "s3.test:0", "must be a host name or address, optionally with :port, such as s3.eu-west-1.amazonaws.com"),
        ("postgres.s3Endpoint", "s3.test\n", "must be a host name or address, optionally with :port, such as s3.eu-west-1.amazonaws.com"),
        ("postgres.s3Bucket", "Backups", "must be an S3 bucket name: 3 to 63 lower-case letters, digits, '.' and '-'"),
        ("postgres.s3Bucket", "a..b", "must be an S3 bucket name: 3 to 63 lower-case letters, digits, '.' and '-'"),
        ("postgres.s3Region", "EU West", "must be a region name such as us-east-1"),
    ],
)  # fmt: skip
def test_s3_settings_are_checked(dotted: str, bad: str, allowed: str) -> None:
    refused(field_parser(dotted), bad, allowed)


@pytest.mark.parametrize(
    ("key", "bad", "rule"),
    [
        ("s3AccessKeyId", "has space", "must be 3 to 128 characters from A-Z a-z 0-9 . _ -"),
        ("s3AccessKeyId", "AKIA\n", "must be 3 to 128 characters from A-Z a-z 0-9 . _ -"),
        ("s3SecretAccessKey", "short", "must be 8 to 256 printable characters, no spaces"),
        ("s3SecretAccessKey", "secret-with\nnewline", "must be 8 to 256 printable characters, no spaces"),
        ("s3CaCertificate", "not a certificate", "must be PEM text (-----BEGIN CERTIFICATE-----)"),
    ],
)
def test_s3_secrets_that_would_break_pgbackrests_config_are_refused(key: str, bad: str, rule: str) -> None:
    with pytest.raises(cfg.SettingsError) as raised:
        cfg.check_secret(key, bad)
    assert str(raised.value) == f"transvidio:{key} (secret, value not shown): {rule}"
    cfg.check_secret(
        key,
        {
            "s3AccessKeyId": "AKIAEXAMPLE",
            "s3SecretAccessKey": "wJalr/K7+MDEN=G",
            "s3CaCertificate": "-----BEGIN CERTIFICATE-----\nx\n",
        }[key],
    )


@pytest.mark.parametrize(
    "nodes, message",
    [
        (2, "must be odd, from 1 to 5 (a majority must survive a loss)"),
        (4, "must be odd, from 1 to 5 (a majority must survive a loss)"),
        (6, "must be a whole number from 1 to 5"),
    ],
)
def test_an_even_or_too_large_etcd_count_is_refused_saying_what_is_allowed(nodes: int, message: str) -> None:
    with pytest.raises(cfg.SettingsError) as raised:
        parse_stack("prod", {"postgres": {"consensusNodes": nodes}})
    assert str(raised.value) == f"transvidio:postgres.consensusNodes={nodes}: {message}"


def test_etcd_counts_of_three_and_five_are_accepted() -> None:
    assert [parse_stack("prod", {"postgres": {"consensusNodes": n}}).postgres.consensus_nodes for n in (3, 5)] == [3, 5]


def test_the_leader_lock_ttl_is_bounded_at_300_seconds() -> None:
    assert parse_stack("prod", {"postgres": {"failoverTtlSeconds": 300}}).postgres.failover_ttl_seconds == 300
    with pytest.raises(cfg.SettingsError, match=r"failoverTtlSeconds=301: must be a whole number from 20 to 300$"):
        parse_stack("prod", {"postgres": {"failoverTtlSeconds": 301}})


def test_a_cpu_limit_of_nothing_is_refused_and_the_smallest_is_read_back_as_the_provider_does() -> None:
    with pytest.raises(ValueError, match=r"^a CPU limit must be positive, not 0$"):
        cfg.provider_cpus(0)
    # One thousandth: nanoInt64ToDecimalString's nine-zero rule, FloatString(1).
    assert cfg.provider_cpus(1) == "0.0"


def test_up_to_eight_api_tokens_and_no_more() -> None:
    names = [f"token-{i}" for i in range(9)]
    assert cfg.token_names("backend.apiTokens", names[:8]) == tuple(names[:8])
    with pytest.raises(cfg.SettingsError, match="must be a list of 1 to 8 distinct names"):
        cfg.token_names("backend.apiTokens", names)


def test_an_s3_endpoints_port_is_from_1_to_65535() -> None:
    for endpoint in ("s3.test:1", "s3.test:65535", "s3.test"):
        assert cfg.optional_endpoint("postgres.s3Endpoint", endpoint) == endpoint
    for endpoint in ("s3.test:0", "s3.test:65536", "s3.test:x"):
        with pytest.raises(cfg.SettingsError, match="must be a host name or address, optionally with :port"):
            cfg.optional_endpoint("postgres.s3Endpoint", endpoint)
