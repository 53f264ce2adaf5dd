"""Hosts: where commands run and files live (local now, the same interface for remote)."""

from migrator.hosts.base import CommandResult, Host, HostProcess
from migrator.hosts.local import LocalHost
from migrator.hosts.ssh import SSHHost, SSHTarget

__all__ = ["CommandResult", "Host", "HostProcess", "LocalHost", "SSHHost", "SSHTarget"]
