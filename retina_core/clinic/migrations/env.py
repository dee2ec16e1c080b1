"""Alembic environment of the clinic database, run programmatically by `retina_core.clinic.db.upgrade` (which
passes an open connection in `config.attributes["connection"]`); no logging configuration is touched."""
from alembic import context

from retina_core.clinic.schema import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the clinic migrations through retina_core.clinic.db.upgrade(url) / downgrade(url, rev)")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
