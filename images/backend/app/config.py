"""The backend's configuration: the env contract the BackendPool passes, read once."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

# One line per API token in the API_TOKENS_FILE secret: its name, then the SHA-256 of the
# token in hex. The backend never holds a token itself, only what it hashes to.
TOKEN_LINE = re.compile(r"([a-z][a-z0-9-]{0,31}) ([0-9a-f]{64})")


@dataclass(frozen=True)
class Limits:
    """What one client may ask of the API; the stack sets each from its settings."""

    max_upload_bytes: int = 500 * 1024 * 1024
    max_json_bytes: int = 64 * 1024
    max_job_seconds: int = 36000
    max_active_jobs_per_token: int = 20
    min_free_disk_bytes: int = 1024**3
    upload_retention_hours: int = 168
    output_retention_hours: int = 168

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Limits:
        names = {
            "max_upload_bytes": "MAX_UPLOAD_BYTES",
            "max_json_bytes": "MAX_JSON_BYTES",
            "max_job_seconds": "MAX_JOB_SECONDS",
            "max_active_jobs_per_token": "MAX_ACTIVE_JOBS_PER_TOKEN",
            "min_free_disk_bytes": "MIN_FREE_DISK_BYTES",
            "upload_retention_hours": "UPLOAD_RETENTION_HOURS",
            "output_retention_hours": "OUTPUT_RETENTION_HOURS",
        }
        values = {}
        for attribute, variable in names.items():
            if env.get(variable):
                try:
                    values[attribute] = int(env[variable])
                except ValueError:
                    raise SystemExit(f"backend: {variable}={env[variable]!r} must be a whole number") from None
        return cls(**values)


@dataclass(frozen=True)
class Config:
    postgres_master_host: str
    postgres_slave_hosts: tuple[str, ...]
    postgres_port: int
    postgres_db: str
    postgres_user: str
    postgres_password: str
    redis_sentinels: tuple[tuple[str, int], ...]
    redis_master_name: str
    redis_user: str
    redis_password: str
    mpi_master_host: str
    secret_key: str
    uploads_dir: str
    outputs_dir: str
    outputs_internal_prefix: str
    dependency_timeout: float
    token_digests: dict[str, str]  # SHA-256 hex of a token -> the token's name
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Config:
        env = dict(os.environ if env is None else env)
        missing = [key for key in REQUIRED if not env.get(key)]
        if missing:
            raise SystemExit(f"backend: missing environment variables: {', '.join(missing)}")
        secrets = {name: read_secret(env, name) for name in SECRET_NAMES}
        sentinels = []
        for entry in env["REDIS_SENTINELS"].split(","):
            host, _, port = entry.strip().rpartition(":")
            sentinels.append((host, int(port)))
        return cls(
            postgres_master_host=env["POSTGRES_MASTER_HOST"],
            postgres_slave_hosts=tuple(h for h in env.get("POSTGRES_SLAVE_HOSTS", "").split(",") if h),
            postgres_port=int(env.get("POSTGRES_PORT", "5432")),
            postgres_db=env["POSTGRES_DB"],
            postgres_user=env["POSTGRES_USER"],
            postgres_password=secrets["POSTGRES_PASSWORD"],
            redis_sentinels=tuple(sentinels),
            redis_master_name=env["REDIS_MASTER_NAME"],
            redis_user=env["REDIS_USER"],
            redis_password=secrets["REDIS_PASSWORD"],
            mpi_master_host=env["MPI_MASTER_HOST"],
            secret_key=secrets["SECRET_KEY"],
            uploads_dir=env.get("UPLOADS_DIR", "/srv/transvidio/uploads"),
            outputs_dir=env["OUTPUTS_DIR"],
            outputs_internal_prefix=env.get("OUTPUTS_INTERNAL_PREFIX", "/_outputs/"),
            dependency_timeout=float(env.get("DEPENDENCY_TIMEOUT_SECONDS", "2")),
            token_digests=parse_token_digests(env["API_TOKENS_FILE"], secrets["API_TOKENS"]),
            limits=Limits.from_env(env),
        )


def read_secret(env: dict[str, str], name: str) -> str:
    """A secret from the file <NAME>_FILE names (never from the environment itself)."""
    path = env[f"{name}_FILE"]
    try:
        with open(path) as secret:
            value = secret.read().strip()
    except OSError as error:
        raise SystemExit(f"backend: {name}_FILE={path} cannot be read: {error.strerror}") from None
    if not value:
        raise SystemExit(f"backend: {name}_FILE={path} is empty")
    return value


def parse_token_digests(path: str, text: str) -> dict[str, str]:
    digests = {}
    for number, line in enumerate(text.splitlines(), start=1):
        match = TOKEN_LINE.fullmatch(line.strip())
        if not match:
            raise SystemExit(f"backend: API_TOKENS_FILE={path} line {number} is not '<name> <sha256 hex>'")
        digests[match.group(2)] = match.group(1)
    return digests


SECRET_NAMES = ("API_TOKENS", "POSTGRES_PASSWORD", "REDIS_PASSWORD", "SECRET_KEY")
REQUIRED = (
    "API_TOKENS_FILE",
    "POSTGRES_MASTER_HOST",
    "POSTGRES_DB",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD_FILE",
    "REDIS_SENTINELS",
    "REDIS_MASTER_NAME",
    "REDIS_USER",
    "REDIS_PASSWORD_FILE",
    "MPI_MASTER_HOST",
    "SECRET_KEY_FILE",
    "OUTPUTS_DIR",
)
