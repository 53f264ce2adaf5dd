"""A machine reached over SSH, behind the same :class:`~migrator.hosts.base.Host` interface.

- :mod:`~migrator.hosts.ssh.connection`: the target, connecting and authenticating,
  and asyncssh failures as migrator errors;
- :mod:`~migrator.hosts.ssh.supervisor`: the remote supervisor that ends every command
  with its channel, the one quoting step, and the processes it runs;
- :mod:`~migrator.hosts.ssh.host`: :class:`SSHHost`, commands and files on the host.
"""

from migrator.hosts.ssh.connection import SSHTarget
from migrator.hosts.ssh.host import SSHHost
from migrator.hosts.ssh.supervisor import SSHProcess

__all__ = ["SSHHost", "SSHProcess", "SSHTarget"]
