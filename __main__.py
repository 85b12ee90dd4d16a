"""transvidio-cluster: settings → secrets → networks → components → exports."""

from components import settings as stack_settings
from components.backend import BackendPool, BackendPoolArgs
from components.mpi import MpiCluster, MpiClusterArgs
from components.network import ClusterNetworks, ClusterNetworksArgs
from components.nginx import NginxLB, NginxLBArgs
from components.outputs import export_stack_outputs
from components.postgres import PostgresReplicaSet, PostgresReplicaSetArgs
from components.redis import RedisSentinelGroup, RedisSentinelGroupArgs
from components.secrets import ClusterSecrets, ClusterSecretsArgs

settings, secret_overrides = stack_settings.load()

secrets = ClusterSecrets(
    "secrets", ClusterSecretsArgs(overrides=secret_overrides, api_token_names=settings.backend.api_tokens)
)

networks = ClusterNetworks("network", ClusterNetworksArgs(settings=settings)).names

postgres = PostgresReplicaSet(
    "postgres",
    PostgresReplicaSetArgs(
        settings=settings,
        networks=networks,
        superuser_password=secrets.postgres_password,
        replication_password=secrets.replication_password,
        rewind_password=secrets.rewind_password,
        patroni_api_password=secrets.patroni_api_password,
        app_password=secrets.app_db_password,
        s3_access_key_id=secrets.s3_access_key_id,
        s3_secret_access_key=secrets.s3_secret_access_key,
        s3_ca_certificate=secrets.s3_ca_certificate,
    ),
)
redis = RedisSentinelGroup(
    "redis",
    RedisSentinelGroupArgs(
        settings=settings,
        networks=networks,
        app_password=secrets.redis_password,
        replication_password=secrets.redis_replication_password,
        sentinel_password=secrets.redis_sentinel_password,
        admin_password=secrets.redis_admin_password,
    ),
)
backends = BackendPool(
    "backend",
    BackendPoolArgs(
        settings=settings,
        networks=networks,
        postgres_password=secrets.app_db_password,
        redis_password=secrets.redis_password,
        secret_key=secrets.secret_key,
        api_tokens=secrets.api_tokens,
        depends_on=[postgres.primary, redis.master],
    ),
)
mpi = MpiCluster(
    "mpi",
    MpiClusterArgs(
        settings=settings,
        networks=networks,
        uploads_volume=backends.uploads_volume.name,
        outputs_volume=backends.outputs_volume.name,
        postgres_password=secrets.app_db_password,
    ),
)
nginx = NginxLB(
    "nginx",
    NginxLBArgs(
        settings=settings,
        networks=networks,
        backend_containers=backends.containers,
        outputs_volume=backends.outputs_volume.name,
        tls_certificate=secrets.tls_certificate,
        tls_key=secrets.tls_key,
    ),
)

export_stack_outputs(settings, secrets, postgres, redis, mpi, backends, nginx)
