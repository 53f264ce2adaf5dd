"""Migration: plan capabilities/parameters, drive the migration, sample query-migrate (QMP)."""

from migrator.migration.driver import MigrationDriver, MigrationResult
from migrator.migration.plan import MigrationPlan, check_capabilities, plan_migration

__all__ = [
    "MigrationDriver",
    "MigrationPlan",
    "MigrationResult",
    "check_capabilities",
    "plan_migration",
]
