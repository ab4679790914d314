#!/usr/bin/env bash
# A private PostgreSQL server for rayhorde's storage tests (validator-core on PostgreSQL).
#
#   scripts/postgres.sh start    # install Debian's postgresql if missing, init + start our cluster
#   scripts/postgres.sh running  # exit 0 when OUR server answers
#   scripts/postgres.sh stop     # stop the server in $DIR (pg_ctl stop -m fast), nothing else
#   scripts/postgres.sh url      # print the SQLAlchemy URL of the test database
#
# The cluster is private to rayhorde: its own data directory (owned by the `postgres` OS user),
# 127.0.0.1 only, an uncommon port and a unix socket directory of its own, trust authentication
# for local connections only. It is a throw-away test server: fsync is off. Debian's own
# "main" cluster is not created by this script's install and is never started or touched.
set -euo pipefail
DIR=${RAYHORDE_PG_DIR:-/var/lib/rayhorde-pg}
PORT=${RAYHORDE_PG_PORT:-55432}
DB=${RAYHORDE_PG_DB:-rayhorde_test}
DATA=$DIR/data
SOCKDIR=$DIR/run
LOG=$DIR/postgres.log
PGUSER_OS=postgres

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "$@" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$@" >/dev/null; }
}

bindir() {  # the newest versioned server binaries Debian installed
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$d" ] && [ -x "$d/pg_ctl" ] && echo "$d"
}

as_pg() {  # initdb and pg_ctl refuse to run as root
  if [ "$(id -u)" = 0 ]; then (cd / && runuser -u "$PGUSER_OS" -- "$@"); else "$@"; fi
}

ensure_installed() {
  bindir >/dev/null && return
  [ "$(id -u)" = 0 ] || { echo "postgresql is not installed and installing it needs root" >&2; exit 1; }
  # Do not let the package create (and try to start) Debian's default cluster on port 5432.
  mkdir -p /etc/postgresql-common/createcluster.d
  [ -e /etc/postgresql-common/createcluster.d/rayhorde.conf ] \
    || echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/rayhorde.conf
  apt_install postgresql
  bindir >/dev/null || { echo "apt-get installed postgresql but no /usr/lib/postgresql/*/bin/pg_ctl" >&2; exit 1; }
}

running() {  # our data directory's postmaster is alive and accepts connections on our port
  local b; b=$(bindir) || return 1
  [ -f "$DATA/PG_VERSION" ] || return 1
  as_pg "$b/pg_ctl" status -D "$DATA" >/dev/null 2>&1 || return 1
  "$b/pg_isready" -q -h "$SOCKDIR" -p "$PORT" -t 2
}

psql_q() { "$(bindir)/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCKDIR" -p "$PORT" -U postgres -d postgres -tA "$@"; }

ensure_db() {
  if [ "$(psql_q -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
    psql_q -c "CREATE DATABASE \"$DB\"" >/dev/null
  fi
}

start() {
  if running; then ensure_db; echo "postgresql already answers on 127.0.0.1:$PORT ($DATA)"; return; fi
  ensure_installed
  local b; b=$(bindir)
  mkdir -p "$DIR"
  [ "$(id -u)" = 0 ] && chown "$PGUSER_OS:$PGUSER_OS" "$DIR"
  chmod 700 "$DIR"
  as_pg mkdir -p "$SOCKDIR"
  if [ ! -f "$DATA/PG_VERSION" ]; then
    as_pg "$b/initdb" -D "$DATA" -U postgres --auth-local=trust --auth-host=trust -E UTF8 --no-locale \
      --no-instructions >"$DIR/initdb.log" 2>&1 \
      || { echo "initdb failed; see $DIR/initdb.log" >&2; tail -20 "$DIR/initdb.log" >&2; exit 1; }
    # pg_hba.conf from initdb: local + 127.0.0.1/32 + ::1/128 only, all trust. Listen on 127.0.0.1.
    as_pg tee -a "$DATA/postgresql.conf" >/dev/null <<EOF
# rayhorde test server (scripts/postgres.sh)
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$SOCKDIR'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
  fi
  [ "$(id -u)" = 0 ] && touch "$LOG" && chown "$PGUSER_OS:$PGUSER_OS" "$LOG"
  if ! as_pg "$b/pg_ctl" start -D "$DATA" -l "$LOG" -w -t 60 -s </dev/null; then
    echo "postgresql did not start on 127.0.0.1:$PORT; see $LOG" >&2; tail -20 "$LOG" >&2; exit 1
  fi
  ensure_db
  echo "postgresql started on 127.0.0.1:$PORT (pid $(head -1 "$DATA/postmaster.pid"), data $DATA)"
}

stop() {
  local b; b=$(bindir) || { echo "postgresql is not installed"; return; }
  if [ -f "$DATA/PG_VERSION" ] && as_pg "$b/pg_ctl" status -D "$DATA" >/dev/null 2>&1; then
    as_pg "$b/pg_ctl" stop -D "$DATA" -m fast -w -t 60 -s
    echo "postgresql stopped ($DATA)"
  else
    echo "no postgresql running from $DATA"
  fi
}

case "${1:-}" in
  start) start ;;
  running) running ;;
  stop) stop ;;
  url) echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/$DB" ;;
  *) echo "usage: $0 start|running|stop|url" >&2; exit 2 ;;
esac
