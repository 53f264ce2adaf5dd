"""Hosts: where commands run and files live (local now, the same interface for remote)."""

from migrator.hosts.base import CommandResult, Host, HostProcess
from migrator.hosts.local import LocalHost

# The SSH host (``migrator.hosts.ssh``) is not imported here: asyncssh costs a tenth of a
# second of start-up, paid only by runs that reach a host over SSH.
__all__ = ["CommandResult", "Host", "HostProcess", "LocalHost"]
