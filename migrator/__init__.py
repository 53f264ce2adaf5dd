"""migrator: QEMU post-copy migration of hugepage-backed VMs, measured."""

__version__ = "0.1.0"
