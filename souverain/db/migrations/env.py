"""Alembic environment: migrations always run on a connection the caller opened (Database.migrate)."""

from alembic import context

from souverain.db.tables import Base

connection = context.config.attributes["connection"]
# One transaction for the whole upgrade, on SQLite too (SQLite's DDL is transactional).
context.configure(connection=connection, target_metadata=Base.metadata, transactional_ddl=True,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
