#!/bin/bash
# Stand-in for the official postgres image's entrypoint: on an empty data directory,
# initdb with POSTGRES_USER/POSTGRES_PASSWORD, create POSTGRES_DB, run the scripts of
# /docker-entrypoint-initdb.d (*.sh sourced-alike, *.sql through psql) against a server
# on the Unix socket only, then serve. Starts as root (to own the volume), serves as
# postgres via gosu, like the original.
set -euo pipefail
: "${POSTGRES_PASSWORD:?the postgres stand-in needs POSTGRES_PASSWORD}"
POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
export POSTGRES_USER POSTGRES_DB POSTGRES_PASSWORD
BIN=/usr/lib/postgresql/15/bin
PGDATA=/var/lib/postgresql/15/docker
SOCK=/var/run/postgresql

if [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA" "$SOCK"
  chown -R postgres:postgres /var/lib/postgresql "$SOCK"
  chmod 0700 "$PGDATA"
  exec gosu postgres "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=$(mktemp)
  printf '%s' "$POSTGRES_PASSWORD" >"$pwfile"
  "$BIN/initdb" -D "$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  "$BIN/pg_ctl" -D "$PGDATA" -o "-c listen_addresses='' -k $SOCK" -w start >/dev/null
  psql=(psql -v ON_ERROR_STOP=1 -h "$SOCK" --username "$POSTGRES_USER" --no-password)
  if [ "$POSTGRES_DB" != postgres ]; then
    "${psql[@]}" --dbname postgres -v db="$POSTGRES_DB" <<<'CREATE DATABASE :"db";'
  fi
  export PGHOST=$SOCK PGUSER=$POSTGRES_USER PGDATABASE=$POSTGRES_DB
  for f in /docker-entrypoint-initdb.d/*; do
    case "$f" in
      *.sh) echo "init: running $f"; bash "$f" ;;
      *.sql) echo "init: running $f"; "${psql[@]}" --dbname "$POSTGRES_DB" -f "$f" ;;
      *) ;;
    esac
  done
  unset PGHOST PGUSER PGDATABASE
  "$BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
fi
exec "$BIN/postgres" -D "$PGDATA" -c listen_addresses=127.0.0.1 -k "$SOCK" "$@"
