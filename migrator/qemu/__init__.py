"""QEMU: command lines, processes and their QMP monitors."""

from migrator.qemu.cmdline import LaunchSpec, qemu_argv, shell_line
from migrator.qemu.monitor import EventRecord, Monitor
from migrator.qemu.process import QemuProcess

__all__ = ["EventRecord", "LaunchSpec", "Monitor", "QemuProcess", "qemu_argv", "shell_line"]
