#!/bin/bash
# The service's own PostgreSQL role and database, for docker-compose.yml: the postgres
# image runs this once, as its superuser, when it initialises an empty volume.
# `vabus` is no superuser and may not create databases or roles; it owns the database
# `vabus`, so the service creates and upgrades its tables there itself (`migrate`, or at
# start-up). The password comes from AGGREGATOR_DB_PASSWORD (compose passes it through).
set -euo pipefail
: "${AGGREGATOR_DB_PASSWORD:?AGGREGATOR_DB_PASSWORD is not set}"
# psql quotes the password (:'password'), so any character works.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v password="$AGGREGATOR_DB_PASSWORD" <<'SQL'
CREATE ROLE vabus LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
  PASSWORD :'password';
CREATE DATABASE vabus OWNER vabus;
REVOKE ALL ON DATABASE vabus FROM PUBLIC;
SQL
