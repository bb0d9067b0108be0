"""The platform database: tables, repositories and Alembic migrations."""
