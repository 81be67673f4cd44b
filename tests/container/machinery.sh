#!/usr/bin/env bash
# Container machinery for `make test-container` on a fresh CI machine (root, Debian 12):
#   machinery.sh up    install docker.io (+ debootstrap, docker-compose) when missing, start
#                      dockerd when not running, build the stand-in base image when missing
#   machinery.sh down  stop dockerd if (and only if) `up` started it
#   machinery.sh run CMD...  up, CMD, then down (whatever CMD's outcome); CMD's status
# Idempotent: every step is skipped when its result is already there.
set -euo pipefail

DOCKER=/usr/bin/docker            # Debian's 20.10 client (a newer one may shadow it in PATH)
BASE_IMAGE=python:3.11-slim-bookworm
STATE_DIR=${VABUS_CONTAINER_STATE:-/var/lib/vabus-container-test}
PIDFILE=$STATE_DIR/dockerd.pid    # present only while a dockerd started by us runs
LOG=$STATE_DIR/dockerd.log

log() { echo "machinery: $*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    log "needs root (apt-get, dockerd, debootstrap)"; exit 1
  fi
}

install_packages() {
  local missing=()
  [ -x "$DOCKER" ] && command -v dockerd >/dev/null || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null
  fi
}

storage_driver() {
  # overlay2 when this kernel lets us mount an overlay (a container starts in 0.5 s);
  # otherwise vfs, which works anywhere but copies the whole image per container (~12 s).
  local t; t=$(mktemp -d)
  mkdir -p "$t"/{l,u,w,m}
  if mount -t overlay overlay -o "lowerdir=$t/l,upperdir=$t/u,workdir=$t/w" "$t/m" 2>/dev/null
  then
    umount "$t/m"; rm -rf "$t"; echo overlay2
  else
    rm -rf "$t"; echo vfs
  fi
}

start_dockerd() {
  if "$DOCKER" info >/dev/null 2>&1; then
    return
  fi
  local driver; driver=$(storage_driver)
  # No bridge or iptables (not available in these sandboxes): containers use
  # --network host. A data root of our own per storage driver: images and BuildKit's
  # cache of one driver are not readable by another.
  log "starting dockerd, storage $driver (log $LOG)"
  setsid dockerd --bridge=none --iptables=false --storage-driver="$driver" \
    --data-root="$STATE_DIR/docker-$driver" >"$LOG" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 60); do
    if "$DOCKER" info >/dev/null 2>&1; then return; fi
    sleep 0.5
  done
  log "dockerd did not come up; see $LOG"; tail -20 "$LOG" >&2; exit 1
}

stop_dockerd() {
  [ -f "$PIDFILE" ] || return 0
  local pid; pid=$(cat "$PIDFILE")
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping the dockerd we started (pid $pid)"
    kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -f "$PIDFILE"
}

build_base_image() {
  if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    return
  fi
  # No registry is reachable: a stand-in for the official image, under its name, from
  # Debian bookworm's own Python 3.11 (the official one has it in /usr/local).
  local root; root=$(mktemp -d "$STATE_DIR/rootfs.XXXXXX")
  log "building the stand-in $BASE_IMAGE with debootstrap (~3 min)"
  debootstrap --variant=minbase \
    --include=python3,python3-pip,python3-venv,ca-certificates bookworm "$root" \
    http://deb.debian.org/debian >"$STATE_DIR/debootstrap.log" 2>&1 \
    || { tail -20 "$STATE_DIR/debootstrap.log" >&2; rm -rf "$root"; exit 1; }
  rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
  ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
  # pip inside the build reaches the package index only with this machine's CA bundle.
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  chmod 0755 "$root"                # mktemp made it 0700: it becomes the image's /
  tar -C "$root" -c . | "$DOCKER" import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$root"
}

case "${1:-}" in
  up)
    need_root
    mkdir -p "$STATE_DIR"
    install_packages
    start_dockerd
    build_base_image
    ;;
  down)
    stop_dockerd
    ;;
  run)
    shift
    need_root
    mkdir -p "$STATE_DIR"
    trap stop_dockerd EXIT
    install_packages
    start_dockerd
    build_base_image
    "$@"
    ;;
  *)
    echo "usage: $0 up|down|run CMD..." >&2; exit 2
    ;;
esac
