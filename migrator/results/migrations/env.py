"""Alembic environment of the results store.

Run only through :func:`migrator.results.store.upgrade`, which hands over an open
connection in ``config.attributes["connection"]``; there is no alembic.ini. To
write a new revision from a source checkout::

    python -c 'from migrator.results.store import alembic_config; \\
        from alembic import command; \\
        command.revision(alembic_config(), "what changed", rev_id="0003")'

then write ``upgrade``/``downgrade`` by hand and mirror the change in
``migrator/results/schema.py`` (a test checks that both agree).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from migrator.results.schema import METADATA


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=METADATA,
        # SQLite cannot ALTER most things; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("the results store migrates online only (migrator.results.store.upgrade)")
connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run through migrator.results.store.upgrade, which passes a connection")
_run(connection)
