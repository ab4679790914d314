#!/usr/bin/env bash
# Start / stop the container engine rayhorde's miners use, and build the local test image.
#
#   scripts/container-engine.sh start   # install docker.io if missing, start a private dockerd
#   scripts/container-engine.sh running # exit 0 when our engine answers
#   scripts/container-engine.sh stop    # stop the dockerd WE started (by its PID file)
#   scripts/container-engine.sh image   # build rayhorde/busybox:local (busybox-static rootfs)
#
# The daemon is private to rayhorde: its own socket, data-root and exec-root, and the three
# network flags, without which dockerd rewrites the host firewall.
set -euo pipefail
STATE=${RAYHORDE_ENGINE_DIR:-/var/lib/rayhorde-engine}
SOCK=${RAYHORDE_DOCKER_SOCK:-/run/rayhorde-docker.sock}
PIDFILE=$STATE/dockerd.pid
IMAGE=${RAYHORDE_TEST_IMAGE:-rayhorde/busybox:local}

ping_engine() { curl -sf --max-time 2 --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1; }

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "$@" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$@" >/dev/null; }
}

start() {
  if ping_engine; then echo "container engine already answers at $SOCK"; return; fi
  command -v dockerd >/dev/null || apt_install docker.io
  command -v curl >/dev/null || apt_install curl
  mkdir -p "$STATE/data" "$STATE/exec"
  setsid dockerd --host "unix://$SOCK" --data-root "$STATE/data" --exec-root "$STATE/exec" \
    --pidfile "$PIDFILE" --storage-driver overlay2 --iptables=false --ip-masq=false \
    --bridge=none >"$STATE/dockerd.log" 2>&1 < /dev/null &
  for _ in $(seq 1 150); do ping_engine && { echo "container engine started at $SOCK (pid $(cat "$PIDFILE"))"; return; }; sleep 0.2; done
  echo "dockerd did not answer within 30 s; see $STATE/dockerd.log" >&2; tail -20 "$STATE/dockerd.log" >&2; exit 1
}

stop() {
  [ -f "$PIDFILE" ] || { echo "no dockerd started by rayhorde"; return; }
  pid=$(cat "$PIDFILE")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
  echo "container engine stopped"
}

image() {
  export DOCKER_HOST="unix://$SOCK"
  if docker image inspect "$IMAGE" >/dev/null 2>&1; then echo "image $IMAGE present"; return; fi
  dpkg -s busybox-static >/dev/null 2>&1 \
    || apt_install busybox-static
  root=$(mktemp -d) && chmod 755 "$root"
  mkdir -p "$root/bin" "$root/tmp" "$root/artifacts" "$root/output" "$root/volume" "$root/etc" "$root/proc" "$root/sys" "$root/dev"
  cp /bin/busybox "$root/bin/busybox"
  for app in $(/bin/busybox --list); do [ "$app" = busybox ] || ln -s busybox "$root/bin/$app"; done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n' > "$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
  tar -C "$root" -c . | docker import -c 'ENV PATH=/bin' - "$IMAGE" >/dev/null
  rm -rf "$root"
  echo "image $IMAGE built"
}

case "${1:-}" in
  running) ping_engine ;;
  start) start ;;
  stop) stop ;;
  image) image ;;
  *) echo "usage: $0 running|start|stop|image" >&2; exit 2 ;;
esac
