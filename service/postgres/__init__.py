"""Shared PostgreSQL adapter code: the schema, SQLSTATE classes and stored text."""
