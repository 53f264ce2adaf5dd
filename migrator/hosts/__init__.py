"""Hosts: where commands run and files live (local now, the same interface for remote)."""

from migrator.hosts.base import CommandResult, Host, HostProcess
from migrator.hosts.local import LocalHost

__all__ = ["CommandResult", "Host", "HostProcess", "LocalHost"]
