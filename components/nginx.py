"""NginxLB: the load balancer in front of the BackendPool."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_docker as docker

from components import render
from components.container import (
    SERVICE_UIDS,
    ContainerSpec,
    Networks,
    VolumeMount,
    config_file,
    role_image,
    secret_file,
    service_container,
)
from components.settings import Settings
from components.topology import NGINX_HTTP_PORT, NGINX_HTTPS_PORT, Topology

COMPONENT = "nginx"


@dataclass(frozen=True)
class NginxLBArgs:
    settings: Settings
    networks: Networks
    backend_containers: Sequence[pulumi.Resource]
    outputs_volume: pulumi.Input[str]
    tls_certificate: pulumi.Input[str] | None = None
    tls_key: pulumi.Input[str] | None = None


class NginxLB(pulumi.ComponentResource):
    """Deploys nginx on the edge network, the only container that publishes ports.

    nginx.conf does not list the pool's members: the entrypoint finds them by their
    network alias and reloads nginx in place, so scaling the pool never replaces nginx;
    /outputs/ is served read-only from the shared volume; HTTPS is added when a
    certificate and key are in secret config.
    """

    def __init__(self, name: str, args: NginxLBArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("transvidio:nginx:NginxLB", name, None, opts)
        s = args.settings
        node = Topology(s).nginx
        uid = SERVICE_UIDS[COMPONENT]
        uploads = [config_file(f"{render.NGINX_CONF_DIR}/nginx.conf", render.nginx_conf(s))]
        extra_ports = []
        if s.nginx.https_port and args.tls_certificate is not None and args.tls_key is not None:
            uploads += [
                secret_file(f"{render.SECRETS_DIR}/tls.crt", args.tls_certificate, uid),
                secret_file(f"{render.SECRETS_DIR}/tls.key", args.tls_key, uid),
            ]
            extra_ports.append(
                docker.ContainerPortArgs(
                    internal=NGINX_HTTPS_PORT, external=s.nginx.https_port, ip=s.network.publish_host_ip, protocol="tcp"
                )
            )
        self.container = service_container(
            name,
            ContainerSpec(
                node=node,
                component=COMPONENT,
                image=role_image(f"{name}-image", COMPONENT, s, self).repo_digest,
                # nginx itself (stub_status answers from 127.0.0.1), not the backends behind it.
                healthcheck=["curl", "-fsS", "-o", "/dev/null", f"http://127.0.0.1:{NGINX_HTTP_PORT}/nginx-status"],
                memory_mb=s.nginx.memory_mb,
                millicpus=s.nginx.millicpus,
                container_port=NGINX_HTTP_PORT,
                envs=[f"{k}={v}" for k, v in sorted(render.nginx_environment().items())],
                volumes=[VolumeMount(args.outputs_volume, render.OUTPUTS_DIR, read_only=True)],
                uploads=uploads,
                extra_ports=extra_ports,
                depends_on=list(args.backend_containers),
                # On a swarm, on every node: a node lost loses one of them, and with host-mode
                # publishing (no routing mesh) each node answers on the port itself.
                every_node=True,
            ),
            s,
            args.networks,
            self,
        )
        host = "localhost" if s.network.publish_host_ip in ("0.0.0.0", "127.0.0.1") else s.network.publish_host_ip
        self.url = f"http://{host}:{s.nginx.http_port}"
        self.register_outputs({"url": self.url})
