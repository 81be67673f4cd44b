#!/bin/sh
# Stand-in for Kafka's tool as the compose health check calls it
# (--bootstrap-server HOST:PORT): succeeds when the broker accepts a connection.
while [ $# -gt 0 ]; do
  case "$1" in --bootstrap-server) server=$2; shift ;; esac
  shift
done
exec python3 -c "import socket, sys; h, p = sys.argv[1].rsplit(':', 1); socket.create_connection((h, int(p)), 5).close()" "${server:-localhost:9092}"
