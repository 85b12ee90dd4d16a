"""transvidio-cluster: the Pulumi components of the video-translation cluster."""
