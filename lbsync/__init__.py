"""lbsync: keep a load balancer in step with service instances registered in etcd."""

# The one place the version is written: pyproject.toml reads it from here (``dynamic``), so
# ``lbsync --version`` needs no importlib.metadata (~25 ms of every command's start-up).
__version__ = "0.1.0"

__all__ = ["__version__"]
