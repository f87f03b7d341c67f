"""controlplane: nginx upstreams and service discovery, kept in step with the Docker engine."""

__version__ = "0.1.0"
