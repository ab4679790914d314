#!/usr/bin/env bash
# Start / stop local container registries (Debian's docker-registry, distribution 2.8) for tests.
#
#   scripts/registry.sh install                  # apt: docker-registry, apache2-utils (htpasswd), curl
#   scripts/registry.sh start [plain|auth|all]   # install docker-registry if missing, start it (idempotent)
#   scripts/registry.sh stop [plain|auth|all]    # stop the registry WE started (by its PID file)
#   scripts/registry.sh running [plain|auth]     # exit 0 when that registry answers
#   scripts/registry.sh url [plain|auth]         # print host:port, as used in image references
#   scripts/registry.sh credentials [auth]       # print {"username": ..., "password": ...} (auth instance)
#
# Two instances, each with its own config, storage and PID file under $RAYHORDE_REGISTRY_DIR:
#   plain  127.0.0.1:${RAYHORDE_REGISTRY_PORT:-55000}       no authentication
#   auth   127.0.0.1:${RAYHORDE_REGISTRY_AUTH_PORT:-55001}  HTTP basic auth (htpasswd, bcrypt); the
#          password is generated on first start and kept in <dir>/auth/password (mode 600)
# Both listen on 127.0.0.1 only and speak plain HTTP: dockerd allows insecure registries on
# 127.0.0.0/8 by default, so no TLS and no daemon flag are needed. The Debian package's systemd
# unit is not used (and does not run here); we start /usr/bin/docker-registry ourselves.
set -euo pipefail
STATE=${RAYHORDE_REGISTRY_DIR:-/var/lib/rayhorde-registry}
USERNAME=${RAYHORDE_REGISTRY_USER:-rayhorde}

port_of() {
  case "$1" in
    plain) echo "${RAYHORDE_REGISTRY_PORT:-55000}" ;;
    auth) echo "${RAYHORDE_REGISTRY_AUTH_PORT:-55001}" ;;
    *) echo "unknown registry instance '$1' (plain|auth)" >&2; exit 2 ;;
  esac
}

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "$@" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$@" >/dev/null; }
}

# 200 (plain) or 401 (auth) from /v2/ means a registry answers on that port.
answers() {
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$(port_of "$1")/v2/" 2>/dev/null || true)
  [ "$code" = 200 ] || [ "$code" = 401 ]
}

ours_alive() {
  local pidfile="$STATE/$1/registry.pid" pid
  [ -f "$pidfile" ] || return 1
  pid=$(cat "$pidfile")
  kill -0 "$pid" 2>/dev/null && [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = /usr/bin/docker-registry ]
}

start_one() {
  local name=$1 port dir pid
  port=$(port_of "$name")
  dir="$STATE/$name"
  if ours_alive "$name" && answers "$name"; then echo "registry $name already answers at 127.0.0.1:$port"; return; fi
  if answers "$name"; then
    echo "something not started by this script answers on 127.0.0.1:$port; stop it or set the port variable" >&2; exit 1
  fi
  [ -x /usr/bin/docker-registry ] || apt_install docker-registry
  command -v curl >/dev/null || apt_install curl
  mkdir -p "$dir/data"
  chmod 700 "$dir"
  local auth_block=""
  if [ "$name" = auth ]; then
    command -v htpasswd >/dev/null || apt_install apache2-utils
    mkdir -p "$dir/auth" && chmod 700 "$dir/auth"
    if [ ! -s "$dir/auth/password" ]; then
      (umask 077; head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/auth/password")
    fi
    (umask 077; htpasswd -Bbn "$USERNAME" "$(cat "$dir/auth/password")" > "$dir/auth/htpasswd")
    printf '%s' "$USERNAME" > "$dir/auth/username"
    auth_block="auth:
  htpasswd:
    realm: rayhorde-registry
    path: $dir/auth/htpasswd"
  fi
  [ -s "$dir/secret" ] || (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/secret")
  cat > "$dir/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$port
  draintimeout: 500ms
  secret: $(cat "$dir/secret")
  headers:
    X-Content-Type-Options: [nosniff]
$auth_block
EOF
  # setsid: out of the caller's process group, so a Ctrl-C of a test run does not take it down
  # (it is stopped by PID). In a non-interactive script the child is not a group leader, so setsid
  # does not fork and $! is the registry's own PID (checked below via /proc/<pid>/exe).
  setsid /usr/bin/docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" > "$dir/registry.pid"
  for _ in $(seq 1 100); do
    if answers "$name"; then
      ours_alive "$name" || { echo "registry answers but PID $pid is not /usr/bin/docker-registry" >&2; exit 1; }
      echo "registry $name started at 127.0.0.1:$port (pid $pid)"; return
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "registry $name did not answer within 10 s; see $dir/registry.log" >&2
  tail -20 "$dir/registry.log" >&2
  kill -TERM "$pid" 2>/dev/null || true
  rm -f "$dir/registry.pid"
  exit 1
}

stop_one() {
  local name=$1 pidfile="$STATE/$1/registry.pid" pid
  port_of "$name" >/dev/null
  [ -f "$pidfile" ] || { echo "no registry $name started by rayhorde"; return; }
  pid=$(cat "$pidfile")
  if ours_alive "$name"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  echo "registry $name stopped"
}

each() {
  local fn=$1 which=${2:-plain}
  if [ "$which" = all ]; then "$fn" plain; "$fn" auth; else "$fn" "$which"; fi
}

install_all() {
  [ -x /usr/bin/docker-registry ] || apt_install docker-registry
  command -v htpasswd >/dev/null || apt_install apache2-utils
  command -v curl >/dev/null || apt_install curl
}

case "${1:-}" in
  install) install_all ;;
  start) each start_one "${2:-plain}" ;;
  stop) each stop_one "${2:-plain}" ;;
  running) answers "${2:-plain}" ;;
  url) echo "127.0.0.1:$(port_of "${2:-plain}")" ;;
  credentials)
    d="$STATE/${2:-auth}/auth"
    [ -s "$d/password" ] || { echo "no credentials: start the auth registry first" >&2; exit 1; }
    printf '{"username": "%s", "password": "%s"}\n' "$(cat "$d/username")" "$(cat "$d/password")" ;;
  *) echo "usage: $0 install|start|stop|running|url|credentials [plain|auth|all]" >&2; exit 2 ;;
esac
