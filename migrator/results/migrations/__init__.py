"""Alembic migrations of the results store, applied by :func:`migrator.results.store.upgrade`."""
