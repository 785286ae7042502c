#!/usr/bin/env bash
# Start madgroup: `deploy/run.sh [--port 8000] [--state DIR] [--host 127.0.0.1]`.
# Creates the environment from uv.lock (needs uv on PATH), creates the MCP client token
# on first start and says where it is kept, then serves the web UI at / and MCP at /mcp.
# `deploy/run.sh --check [--port 8000] [--wait SECONDS]`: exit 0 once /healthz answers 200.
# Nothing is written beside the sources: state and venv live under $STATE and $VENV.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-8000}
HOST=${HOST:-127.0.0.1}
STATE=${STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/madgroup}
VENV=${VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/madgroup/venv}
CHECK=0
WAIT=0
while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT=$2; shift 2 ;;
    --host) HOST=$2; shift 2 ;;
    --state) STATE=$2; shift 2 ;;
    --check) CHECK=1; shift ;;
    --wait) WAIT=$2; shift 2 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
done
PY=$VENV/bin/python

if [ "$CHECK" = 1 ]; then
  # The health probe of the systemd unit and the container; a wildcard address is probed on loopback.
  case "$HOST" in 0.0.0.0) PROBE=127.0.0.1 ;; ::) PROBE="[::1]" ;; *:*) PROBE="[$HOST]" ;; *) PROBE=$HOST ;; esac
  # Only the standard library is used: while a first start still builds $VENV, the host's python3 probes.
  [ -x "$PY" ] || PY=python3
  exec "$PY" - "http://$PROBE:$PORT/healthz" "$WAIT" <<'PY'
import sys, time, urllib.error, urllib.request
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while True:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            sys.exit(0 if answer.status == 200 else 1)
    except (OSError, urllib.error.URLError) as exc:
        if time.monotonic() >= deadline:
            sys.exit(f"run.sh --check: {url} is not healthy: {exc}")
    time.sleep(0.5)
PY
fi

if ! command -v uv >/dev/null 2>&1; then
  echo "run.sh: uv is needed to create the environment: pip install uv" >&2
  exit 2
fi
# Whatever environment the caller is in (a nox session, a venv, a Docker image that sets
# UV_PROJECT_ENVIRONMENT), the ecosystem gets its own, exactly as locked.
unset VIRTUAL_ENV UV_FROZEN  # --locked checks the lock against pyproject.toml; UV_FROZEN would forbid that
export UV_PROJECT_ENVIRONMENT=$VENV
uv sync --locked --no-dev --quiet
mkdir -p "$STATE"
TOKEN_FILE=$("$PY" -m madgroup token --state "$STATE")
echo "run.sh: state in $STATE; the MCP client token is kept in $TOKEN_FILE (mode 0600)."
echo "run.sh: clients send it as the header 'Authorization: Bearer <token>' to http://$HOST:$PORT/mcp"
# exec the environment's Python itself: it is the process that systemd or Docker signal
# (SIGTERM drains and stops it), and no launcher stays resident beside it.
exec "$PY" -m madgroup serve --host "$HOST" --port "$PORT" --state "$STATE"
