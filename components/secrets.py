"""ClusterSecrets: the stack's passwords and API tokens, generated unless set as secret config."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_random as random

from components.settings import SecretOverrides

# Config key -> (child name, length). URL-safe alphabet: these land in DSNs and config files.
GENERATED = {
    "postgresPassword": ("postgres-superuser", 32),
    "replicationPassword": ("postgres-replication", 32),
    "rewindPassword": ("postgres-rewind", 32),
    "patroniApiPassword": ("patroni-api", 32),
    "appDbPassword": ("postgres-app", 32),
    "redisPassword": ("redis", 32),
    "redisReplicationPassword": ("redis-replication", 32),
    "redisSentinelPassword": ("redis-sentinel", 32),
    "redisAdminPassword": ("redis-admin", 32),
    "secretKey": ("secret-key", 48),
}
API_TOKEN_LENGTH = 40
OPERATORS_ONLY = ("tlsCertificate", "tlsKey", "s3AccessKeyId", "s3SecretAccessKey", "s3CaCertificate")


@dataclass(frozen=True)
class ClusterSecretsArgs:
    overrides: SecretOverrides
    api_token_names: Sequence[str]


class ClusterSecrets(pulumi.ComponentResource):
    """Deploys one RandomPassword per secret the cluster needs, and one per API token name;
    each output is secret.

    A value set with `pulumi config set --secret <key>` replaces the generated one
    (the RandomPassword is still created, so switching back is not a new password). An
    API token is rotated by renaming it in `backend.apiTokens`: the new name gets a new
    token, and the old one stops working once it is gone from the list.
    """

    postgres_password: pulumi.Output[str]
    replication_password: pulumi.Output[str]
    rewind_password: pulumi.Output[str]
    patroni_api_password: pulumi.Output[str]
    app_db_password: pulumi.Output[str]
    redis_password: pulumi.Output[str]
    redis_replication_password: pulumi.Output[str]
    redis_sentinel_password: pulumi.Output[str]
    redis_admin_password: pulumi.Output[str]
    secret_key: pulumi.Output[str]
    api_tokens: dict[str, pulumi.Output[str]]
    tls_certificate: pulumi.Output[str] | None
    tls_key: pulumi.Output[str] | None
    s3_access_key_id: pulumi.Output[str] | None
    s3_secret_access_key: pulumi.Output[str] | None
    s3_ca_certificate: pulumi.Output[str] | None

    def __init__(self, name: str, args: ClusterSecretsArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("transvidio:secrets:ClusterSecrets", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        values: dict[str, pulumi.Output[str]] = {}
        for key, (child_name, length) in GENERATED.items():
            generated = random.RandomPassword(f"{name}-{child_name}", length=length, special=False, opts=child)
            override = args.overrides.get(key)
            values[key] = pulumi.Output.secret(override if override is not None else generated.result)
        self.postgres_password = values["postgresPassword"]
        self.replication_password = values["replicationPassword"]
        self.rewind_password = values["rewindPassword"]
        self.patroni_api_password = values["patroniApiPassword"]
        self.app_db_password = values["appDbPassword"]
        self.redis_password = values["redisPassword"]
        self.redis_replication_password = values["redisReplicationPassword"]
        self.redis_sentinel_password = values["redisSentinelPassword"]
        self.redis_admin_password = values["redisAdminPassword"]
        self.secret_key = values["secretKey"]
        self.api_tokens = {
            token: pulumi.Output.secret(
                random.RandomPassword(
                    f"{name}-api-token-{token}", length=API_TOKEN_LENGTH, special=False, opts=child
                ).result
            )
            for token in args.api_token_names
        }
        # Set by the operator only: nothing here generates them.
        given = {
            key: pulumi.Output.secret(args.overrides.get(key))
            for key in OPERATORS_ONLY
            if args.overrides.get(key) is not None
        }
        self.tls_certificate = given.get("tlsCertificate")
        self.tls_key = given.get("tlsKey")
        self.s3_access_key_id = given.get("s3AccessKeyId")
        self.s3_secret_access_key = given.get("s3SecretAccessKey")
        self.s3_ca_certificate = given.get("s3CaCertificate")
        self.register_outputs({})
