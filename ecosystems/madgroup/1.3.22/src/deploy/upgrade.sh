#!/usr/bin/env bash
# Blue/green upgrade of madgroup on one PostgreSQL state (RUNBOOK.md, "Blue/green upgrade"). Run it
# from the NEW release's folder, while the old version serves:
#   deploy/upgrade.sh --old-pid PID --state DIR [--db URL] [--port PORT] [--switch CMD] [options]
# 1. records the state's migration level; 2. starts the new version beside the old one on the same database
# (its pending expand migrations run at its start; a contract one is refused while the old version is live,
# and the new version exits saying so, nothing changed); 3. waits for its /healthz; 4. runs --switch CMD
# with the new port as $1 (and $NEW_PORT) to move the traffic over; 5. waits --settle seconds for calls
# already on the old version, then stops it with SIGTERM (it drains: calls in flight finish, new requests get
# 503 with Retry-After). If the new version never gets healthy, or the switch fails, it rolls back: stops
# the new version, undoes what it migrated (`migrate down`), and leaves the old one serving; exit 1.
# Options: --host H (default 127.0.0.1) --health-timeout S (default 120) --settle S (default 5)
#   --stop-timeout S (default 60: the old version's drain) --log FILE (the new version's output)
# The database is $MADGROUP_DB_URL or --db URL. The new version's Python is $PY, else $VENV/bin/python:
# make that environment first, from this folder: UV_PROJECT_ENVIRONMENT=/path/to/venv uv sync --locked --no-dev
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."

PY=${PY:-${VENV:+$VENV/bin/python}}
DB=${MADGROUP_DB_URL:-}
OLD_PID=""
STATE=""
HOST=127.0.0.1
PORT=""
SWITCH=""
HEALTH_TIMEOUT=120
SETTLE=5
STOP_TIMEOUT=60
LOG=""

die() { echo "upgrade.sh: $*" >&2; exit 2; }
step() { echo "upgrade.sh: $*"; }
usage() { sed -n '2,15p' "$SELF"; }
# Whether the process $1 runs (one that exited but that its parent has not reaped yet, a zombie, does not).
running() {
  kill -0 "$1" 2>/dev/null || return 1
  case "$(ps -o stat= -p "$1" 2>/dev/null)" in *Z*) return 1 ;; esac
}

while [ $# -gt 0 ]; do
  case "$1" in
    --old-pid) OLD_PID=$2; shift 2 ;;
    --state) STATE=$2; shift 2 ;;
    --db) DB=$2; shift 2 ;;
    --host) HOST=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --switch) SWITCH=$2; shift 2 ;;
    --health-timeout) HEALTH_TIMEOUT=$2; shift 2 ;;
    --settle) SETTLE=$2; shift 2 ;;
    --stop-timeout) STOP_TIMEOUT=$2; shift 2 ;;
    --log) LOG=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (try --help)" ;;
  esac
done
if [ -z "$PY" ] || [ ! -x "$PY" ]; then
  die "no Python for the new version${PY:+ at $PY}: make its environment from this folder (UV_PROJECT_ENVIRONMENT=/path/to/venv uv sync --locked --no-dev), then set VENV=/path/to/venv or PY"
fi
[ -n "$DB" ] || die "which database? pass --db postgresql://USER@HOST:5432/DB or set MADGROUP_DB_URL (the old version's)"
[ -n "$STATE" ] || die "pass --state DIR: the new version's state directory (the old version's on the same host, or one with the same MADGROUP_SECRETS_KEY)"
[ -n "$OLD_PID" ] || die "pass --old-pid PID: the old version's serve process, stopped once the traffic has moved"
running "$OLD_PID" || die "no process $OLD_PID: is the old version running? (nothing changed)"
export MADGROUP_DB_URL="$DB"

eco() { "$PY" -m madgroup "$@"; }
[ -n "$PORT" ] || PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
[ -n "$LOG" ] || LOG=$(mktemp "${TMPDIR:-/tmp}/madgroup-upgrade.XXXXXX")
case "$HOST" in 0.0.0.0) PROBE=127.0.0.1 ;; ::) PROBE="[::1]" ;; *:*) PROBE="[$HOST]" ;; *) PROBE=$HOST ;; esac

# The state's migration level (the highest number recorded in schema_migrations).
level() {
  eco migrate status --state "$STATE" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["level"])'
}

# 0 once http://$PROBE:$1/healthz answers 200; 1 when the process $2 exits first or $3 seconds pass.
healthy() {
  "$PY" - "http://$PROBE:$1/healthz" "$2" "$3" <<'EOF'
import os, sys, time, urllib.request
url, pid, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"upgrade.sh: the new version (pid {pid}) exited before it was healthy")
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            if answer.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit(f"upgrade.sh: {url} was not healthy within {sys.argv[3]}s")
EOF
}

# Stop the process $1 with SIGTERM (it drains), waiting up to $2 seconds, then SIGKILL.
stop() {
  kill -TERM "$1" 2>/dev/null || return 0
  for _ in $(seq 1 "$(( $2 * 2 ))"); do running "$1" || return 0; sleep 0.5; done
  echo "upgrade.sh: process $1 did not stop within $2s: killing it" >&2
  kill -9 "$1" 2>/dev/null || true
}

# The new version failed: stop it, undo the migrations it applied, leave the old version serving.
rollback() {
  step "rolling back: $1"
  stop "$NEW_PID" "$STOP_TIMEOUT"
  wait "$NEW_PID" 2>/dev/null || true
  local now
  now=$(level)
  if [ "$now" -gt "$BEFORE" ]; then
    step "undoing the migrations above $BEFORE that the new version applied"
    # A new version killed (not stopped) counts as live until its heartbeat lapses: --wait covers that.
    eco migrate down --to "$BEFORE" --state "$STATE" --wait 40 \
      || die "the new version is stopped, but its migrations could not be undone (above); the old version (pid $OLD_PID) still serves: the state is ahead of it only by what it works with, or it would not be serving. Log: $LOG"
  fi
  running "$OLD_PID" || die "rolled back, but the old version (pid $OLD_PID) is no longer running: start it again"
  echo "upgrade.sh: rolled back: the old version (pid $OLD_PID) still serves, the state is at migration $BEFORE; the new version's log: $LOG" >&2
  exit 1
}

BEFORE=$(level) || die "cannot read the state's migrations (above); nothing changed"
step "1. the state is at migration $BEFORE; the old version is pid $OLD_PID"
step "2. the new version on $HOST:$PORT, state $STATE (log: $LOG)"
nohup "$PY" -m madgroup serve --host "$HOST" --port "$PORT" --state "$STATE" >"$LOG" 2>&1 &
NEW_PID=$!
if ! healthy "$PORT" "$NEW_PID" "$HEALTH_TIMEOUT"; then
  if ! running "$NEW_PID" && [ "$(level)" = "$BEFORE" ]; then  # refused at start: it changed nothing
    sed -n 's/^error: /upgrade.sh: the new version refused to start: /p' "$LOG" >&2
    echo "upgrade.sh: nothing changed; the old version (pid $OLD_PID) still serves. Log: $LOG" >&2
    exit 1
  fi
  rollback "the new version did not get healthy within ${HEALTH_TIMEOUT}s"
fi
step "3. the new version (pid $NEW_PID) is healthy at migration $(level)"
if [ -n "$SWITCH" ]; then
  step "4. switching the traffic: $SWITCH $PORT"
  NEW_PORT=$PORT bash -c "$SWITCH" upgrade-switch "$PORT" || rollback "the switch command failed"
else
  step "4. no --switch: send the traffic to $HOST:$PORT yourself now"
fi
step "5. after ${SETTLE}s for the calls already on the old version, SIGTERM to it (pid $OLD_PID); it drains"
sleep "$SETTLE"
stop "$OLD_PID" "$STOP_TIMEOUT"
echo "upgrade.sh: done: the new version serves on $HOST:$PORT (pid $NEW_PID, log $LOG); the old one is stopped"
