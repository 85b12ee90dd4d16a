"""The backend's configuration: the env contract the BackendPool passes, read once."""

from __future__ import annotations

import os
from dataclasses import dataclass


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
    redis_password: str
    mpi_master_host: str
    secret_key: str
    uploads_dir: str
    outputs_dir: str
    dependency_timeout: float

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
            redis_password=secrets["REDIS_PASSWORD"],
            mpi_master_host=env["MPI_MASTER_HOST"],
            secret_key=secrets["SECRET_KEY"],
            uploads_dir=env.get("UPLOADS_DIR", "/srv/transvidio/uploads"),
            outputs_dir=env["OUTPUTS_DIR"],
            dependency_timeout=float(env.get("DEPENDENCY_TIMEOUT_SECONDS", "2")),
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


SECRET_NAMES = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "SECRET_KEY")
REQUIRED = (
    "POSTGRES_MASTER_HOST",
    "POSTGRES_DB",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD_FILE",
    "REDIS_SENTINELS",
    "REDIS_MASTER_NAME",
    "REDIS_PASSWORD_FILE",
    "MPI_MASTER_HOST",
    "SECRET_KEY_FILE",
    "OUTPUTS_DIR",
)
