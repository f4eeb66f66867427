#!/usr/bin/env bash
# Run README.md's two set-up commands on a fresh Debian 12, as a newcomer would, in a chroot.
#
#   sudo bash scripts/fresh-debian-check.sh [ROOT] [PORT]
#
# ROOT (default /tmp/meterproxy-debian12, outside the repository) receives a minimal Debian 12
# built by debootstrap --variant=minbase: what the `debian:12` container image holds (no python3,
# no git, no curl), plus the image's policy-rc.d (package installs start no services). Where a
# container runtime answers, `docker run --rm -it debian:12` is the same start. Then, inside:
#
#   1. the newcomer's own steps: apt-get install git ca-certificates python3 python3-venv (README
#      says so), git clone of this repository (its HEAD commit);
#   2. README command 1, exactly: python3 -m venv .venv && .venv/bin/pip install . && \
#      .venv/bin/meterproxy serve   (METERPROXY_PORT=PORT, default 22087: 8787 may be taken here);
#      checked from outside with GET /healthz, then stopped;
#   3. README command 2, exactly: bash .ci/run   (PYTEST_ADDOPTS, if set, passes through, e.g.
#      PYTEST_ADDOPTS="-x" or "-k layers" for a shorter check).
#
# Logs and a summary go to ROOT/../$(basename ROOT)-logs. docs/fresh-debian.md has the results.
#
# Sandbox notes (not newcomer steps): the chroot shares the host's network namespace, so the
# host's /etc/hosts and resolv.conf are copied in, and any CA in /usr/local/share/ca-certificates
# (a machine whose HTTPS goes through an intercepting proxy) is trusted inside too. A PostgreSQL
# already listening on the host's 127.0.0.1:5432 is seen from inside as well: .ci/run then uses it
# rather than starting the chroot's own cluster.
set -euo pipefail

ROOT="${1:-/tmp/meterproxy-debian12}"
PORT="${2:-22087}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
LOGS="$(dirname "$ROOT")/$(basename "$ROOT")-logs"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
mkdir -p "$LOGS"
summary="$LOGS/summary.txt"
: >"$summary"
note() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$summary"; }

[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, chroot, mount)" >&2; exit 2; }
command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null

if [ ! -x "$ROOT/usr/bin/apt-get" ]; then
  note "debootstrap bookworm (minbase) into $ROOT"
  start=$SECONDS
  debootstrap --variant=minbase bookworm "$ROOT" "$MIRROR" >"$LOGS/debootstrap.log" 2>&1
  note "debootstrap done in $((SECONDS - start)) s"
fi
# As in the debian:12 image: maintainer scripts start no services.
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod +x "$ROOT/usr/sbin/policy-rc.d"
cp /etc/hosts /etc/resolv.conf "$ROOT/etc/"
mkdir -p "$ROOT/usr/local/share/ca-certificates"
cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/" 2>/dev/null || true

mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
mountpoint -q "$ROOT/sys" || mount -t sysfs sysfs "$ROOT/sys"
mountpoint -q "$ROOT/dev" || mount --rbind /dev "$ROOT/dev"
mkdir -p "$ROOT/src"
mountpoint -q "$ROOT/src" || mount --bind -o ro "$REPO" "$ROOT/src"
serve_pid=""
cleanup() {
  [ -n "$serve_pid" ] && kill -- "-$serve_pid" 2>/dev/null || true
  umount "$ROOT/src" 2>/dev/null || true
  umount -R "$ROOT/dev" 2>/dev/null || true
  umount "$ROOT/sys" "$ROOT/proc" 2>/dev/null || true
}
trap cleanup EXIT

in_root() { chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  LANG=C.UTF-8 TERM=dumb "$@"; }

note "newcomer steps: apt-get install git ca-certificates python3 python3-venv; git clone"
start=$SECONDS
in_root bash -ec 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
  git ca-certificates python3 python3-venv >/dev/null && update-ca-certificates >/dev/null
  rm -rf /root/meterproxy && git clone -q /src /root/meterproxy && git -C /root/meterproxy log --oneline -1' \
  >"$LOGS/prepare.log" 2>&1
note "prepared in $((SECONDS - start)) s: $(tail -1 "$LOGS/prepare.log")"

note "README command 1: python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/meterproxy serve"
start=$SECONDS
# In its own process group (setsid), so the stop below reaches the server and not this script.
setsid chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  LANG=C.UTF-8 TERM=dumb METERPROXY_PORT="$PORT" bash -c \
  'cd /root/meterproxy && python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/meterproxy serve' \
  >"$LOGS/serve.log" 2>&1 &
serve_pid=$!
healthy=""
for _ in $(seq 600); do  # the install takes a while; the deadline is 10 minutes
  if ! kill -0 "$serve_pid" 2>/dev/null; then break; fi
  if body="$(curl -fsS "http://127.0.0.1:$PORT/healthz" 2>/dev/null)"; then healthy="$body"; break; fi
  sleep 1
done
if [ -n "$healthy" ]; then
  note "serve answered /healthz on 127.0.0.1:$PORT after $((SECONDS - start)) s: $healthy"
else
  note "FAILED: serve did not answer /healthz (log: $LOGS/serve.log)"
  tail -20 "$LOGS/serve.log" | tee -a "$summary"
fi
kill -INT -- "-$serve_pid" 2>/dev/null || true
wait "$serve_pid" 2>/dev/null || true
serve_pid=""
note "serve stopped; its last line: $(tail -1 "$LOGS/serve.log")"
[ -n "$healthy" ] || exit 1

note "README command 2: bash .ci/run${PYTEST_ADDOPTS:+ (PYTEST_ADDOPTS=$PYTEST_ADDOPTS)}"
start=$SECONDS
set +e
in_root env ${PYTEST_ADDOPTS:+PYTEST_ADDOPTS="$PYTEST_ADDOPTS"} bash -c 'cd /root/meterproxy && bash .ci/run' \
  >"$LOGS/ci-run.log" 2>&1
rc=$?
set -e
note ".ci/run exited $rc after $((SECONDS - start)) s; stages reached: $(grep -c '^== ' "$LOGS/ci-run.log")"
grep '^== ' "$LOGS/ci-run.log" | tee -a "$summary"
tail -5 "$LOGS/ci-run.log" | tee -a "$summary"
exit "$rc"
