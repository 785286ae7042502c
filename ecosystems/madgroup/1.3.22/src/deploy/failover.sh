#!/usr/bin/env bash
# Two replicas of madgroup on one Redis (RUNBOOK.md, "Failover: two replicas on one Redis").
#   deploy/failover.sh status            the shared bus: per MAD, deliveries queued, pending and taken over, and
#                                        each consumer (one per process start): what it holds, idle time, alive
#   deploy/failover.sh forget CONSUMER   remove a dead replica's consumer once it holds nothing
#   deploy/failover.sh drill [options]   rehearse a failover on 127.0.0.1: replica A, then B, on the same
#                                        Redis and key; kill -9 A while it holds requests; B takes them over
#     drill options: --count N (requests, default 8) --from MAD --to MAD --tool TOOL --args JSON
#     --claim-idle S (default 2) --timeout S (per reply, default 120) --hold S (A holds each delivery
#     S seconds before running it, default 3600: it is killed holding them; 0: the tool's own pace)
#     --db URL (default $MADGROUP_DB_URL): A and B share this PostgreSQL state, as production replicas do
# The bus is $MADGROUP_BUS_URL or --bus URL. The ecosystem's Python is $PY, else $VENV/bin/python
# as deploy/run.sh builds it (run that once first).
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."

VENV=${VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/madgroup/venv}
PY=${PY:-$VENV/bin/python}
BUS=${MADGROUP_BUS_URL:-}
DB=${MADGROUP_DB_URL:-}
# The drill's traffic: one MAD asking another (from the spec's talks_to), by default without a tool's arguments.
FROM=rogers
TO=turing
TOOL=list_secrets
ARGS='{}'
PROSE="failover drill"
COUNT=8
CLAIM_IDLE=2
TIMEOUT=120
HOLD=3600

die() { echo "failover.sh: $*" >&2; exit 2; }
usage() { sed -n '2,12p' "$SELF"; }
eco() { "$PY" -m madgroup "$@"; }  # (servers are started without it: $! must be their own pid)

[ $# -gt 0 ] || { usage; exit 2; }
COMMAND=$1
shift
POSITIONAL=()
while [ $# -gt 0 ]; do
  case "$1" in
    --bus) BUS=$2; shift 2 ;;
    --from) FROM=$2; shift 2 ;;
    --to) TO=$2; shift 2 ;;
    --tool) TOOL=$2; shift 2 ;;
    --args) ARGS=$2; shift 2 ;;
    --count) COUNT=$2; shift 2 ;;
    --claim-idle) CLAIM_IDLE=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --hold) HOLD=$2; shift 2 ;;
    --db) DB=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option $1 (try --help)" ;;
    *) POSITIONAL+=("$1"); shift ;;
  esac
done
[ -x "$PY" ] || die "no Python at $PY: run deploy/run.sh once (it builds $VENV), or set PY"
[ -n "$BUS" ] || die "which Redis? pass --bus redis://HOST:6379/0 or set MADGROUP_BUS_URL"

# The number of $TO's deliveries held by the process with pid $1 (consumers are named host:pid:tag).
holding() {
  eco bus status --bus "$BUS" | "$PY" -c '
import json, sys
mad = json.load(sys.stdin)["mads"].get(sys.argv[1], {"consumers": []})
print(sum(c["pending"] for c in mad["consumers"] if c["name"].split(":")[-2] == sys.argv[2]))' "$TO" "$1"
}

# How many of $TO's deliveries processes took over from silent ones, since the bus began.
taken_over() {
  eco bus status --bus "$BUS" | "$PY" -c '
import json, sys
print(json.load(sys.stdin)["mads"].get(sys.argv[1], {}).get("taken_over", 0))' "$TO"
}

# The names of the consumers of the processes with pids $1...
consumer_of() {
  eco bus status --bus "$BUS" | "$PY" -c '
import json, sys
names = {c["name"] for m in json.load(sys.stdin)["mads"].values() for c in m["consumers"] if c["name"].split(":")[-2] in sys.argv[1:]}
print(" ".join(sorted(names)))' "$@"
}

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Wait until http://127.0.0.1:$1/healthz answers 200, at most $2 seconds.
healthy() {
  "$PY" - "$1" "$2" <<'EOF'
import sys, time, urllib.request
url, deadline = f"http://127.0.0.1:{sys.argv[1]}/healthz", time.monotonic() + float(sys.argv[2])
while True:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            if answer.status == 200:
                sys.exit(0)
    except OSError as exc:
        if time.monotonic() >= deadline:
            sys.exit(f"failover.sh: {url} is not healthy: {exc}")
    time.sleep(0.2)
EOF
}

send() {  # send N: N requests $FROM -> $TO through the bus; one JSON line per reply on stdout
  if [ -n "$TOOL" ]; then
    eco bus send --bus "$BUS" --state "$WORK/sender" --from "$FROM" --to "$TO" --tool "$TOOL" --args "$ARGS" --count "$1" --timeout "$TIMEOUT"
  else
    eco bus send --bus "$BUS" --state "$WORK/sender" --from "$FROM" --to "$TO" --prose "$PROSE" --count "$1" --timeout "$TIMEOUT"
  fi
}

step() { echo "failover.sh: $*"; }

# On a failed drill: no process left behind, B stopped cleanly if it runs (it leaves the bus), and the
# consumers of A and B removed from the bus unless they hold deliveries (those would be lost: a live
# replica takes them over, then removes the consumer). The logs stay in $WORK.
cleanup() {
  local pid names whole=${CLAIM_IDLE%.*}
  for pid in "${PIDS[@]}"; do
    [ "$pid" = "${B_PID:-}" ] || kill -9 "$pid" 2>/dev/null || true
  done
  if [ -n "${B_PID:-}" ] && kill -0 "$B_PID" 2>/dev/null; then
    kill -TERM "$B_PID" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$B_PID" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$B_PID" 2>/dev/null || true
  fi
  names=$(consumer_of "${A_PID:-}" "${B_PID:-}" 2>/dev/null || true)
  if [ -n "$names" ]; then  # a killed process counts as alive until its heartbeat lapses, --claim-idle later
    # shellcheck disable=SC2086
    eco bus forget --bus "$BUS" --wait "$(( ${whole:-0} + 2 ))" $names >/dev/null || true  # says why not: it holds deliveries
  fi
}

drill() {
  if [ -z "$FROM" ] || [ -z "$TO" ]; then
    die "no MAD of madgroup talks to another: pass --from MAD --to MAD"
  fi
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/madgroup-failover.XXXXXX")
  PIDS=()
  A_PID=""
  B_PID=""
  trap cleanup EXIT
  # Both replicas need the same secrets key: the bus carries envelopes sealed with it.
  MADGROUP_SECRETS_KEY=${MADGROUP_SECRETS_KEY:-$("$PY" -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')}
  export MADGROUP_SECRETS_KEY
  local port_a port_b sender held taken before answered pending left whole=${CLAIM_IDLE%.*}
  port_a=$(free_port)
  port_b=$(free_port)
  before=$(taken_over)

  # Without the postgres pack (or a URL) each replica keeps its state in its own SQLite file.
  export MADGROUP_DB_URL="$DB"
  step "1. replica A on 127.0.0.1:$port_a, state $WORK/a${DB:+ and the shared database}, bus $BUS; it holds each delivery ${HOLD}s before running it"
  "$PY" -m madgroup serve --host 127.0.0.1 --port "$port_a" --state "$WORK/a" --bus "$BUS" --claim-idle "$CLAIM_IDLE" \
    --drill-hold "$HOLD" >"$WORK/a.log" 2>&1 &
  A_PID=$!
  PIDS+=("$A_PID")
  healthy "$port_a" 60

  step "2. $COUNT requests $FROM -> $TO${TOOL:+ ($TOOL)} through the bus; A takes them"
  send "$COUNT" >"$WORK/replies.jsonl" 2>"$WORK/sender.log" &
  sender=$!
  PIDS+=("$sender")
  held=0
  for _ in $(seq 1 "$((TIMEOUT * 2))"); do
    held=$(holding "$A_PID")
    [ "$held" -gt 0 ] && break
    kill -0 "$sender" 2>/dev/null || break  # all answered already: A held nothing (--hold 0 and a fast tool)
    sleep 0.5
  done

  step "3. replica B on 127.0.0.1:$port_b, state $WORK/b${DB:+ and the same database}, same bus and key"
  "$PY" -m madgroup serve --host 127.0.0.1 --port "$port_b" --state "$WORK/b" --bus "$BUS" --claim-idle "$CLAIM_IDLE" \
    >"$WORK/b.log" 2>&1 &
  B_PID=$!
  PIDS+=("$B_PID")
  healthy "$port_b" 60

  held=$(holding "$A_PID")  # A only gains deliveries while it holds them: at least this many when killed
  step "4. kill -9 A (pid $A_PID), which holds $held deliveries"
  kill -9 "$A_PID"
  wait "$A_PID" 2>/dev/null || true

  step "5. B takes A's deliveries over once idle for ${CLAIM_IDLE}s; every request is answered"
  if ! wait "$sender"; then
    die "not every request was answered; replies in $WORK/replies.jsonl, logs in $WORK"
  fi
  answered=$(grep -c '"ok": true' "$WORK/replies.jsonl" || true)
  [ "$answered" = "$COUNT" ] || die "$answered of $COUNT requests answered; logs in $WORK"
  taken=$(( $(taken_over) - before ))
  [ "$taken" -gt 0 ] || die "B took over none of A's deliveries (A held $held when it was killed): the takeover was not exercised; logs in $WORK"
  [ "$taken" -ge "$held" ] || die "B took over $taken of the $held deliveries A held; logs in $WORK"

  step "6. nothing pending on the bus; B answers a new request and /healthz"
  pending=$(eco bus status --bus "$BUS" | "$PY" -c 'import json, sys; print(sum(m["pending"] for m in json.load(sys.stdin)["mads"].values()))')
  [ "$pending" = 0 ] || die "$pending deliveries still pending; see: deploy/failover.sh status --bus $BUS"
  send 1 >>"$WORK/replies.jsonl" 2>>"$WORK/sender.log" || die "B did not answer a new request; logs in $WORK"
  healthy "$port_b" 10

  step "7. A's consumer is off the bus (B removed it once it had taken A's deliveries over); B stops cleanly"
  left=$(consumer_of "$A_PID")
  if [ -n "$left" ]; then  # B runs every MAD, so it removed them: this is a fallback
    # shellcheck disable=SC2086
    eco bus forget --bus "$BUS" --wait "$(( ${whole:-0} + 2 ))" $left
  fi
  kill -TERM "$B_PID"
  wait "$B_PID" || die "B did not stop cleanly; log in $WORK/b.log"
  B_PID=""
  rm -rf "$WORK"
  trap - EXIT
  echo "failover.sh: drill passed: A held $held deliveries when it was killed; B took over $taken, answered all $COUNT requests and kept serving"
}

case "$COMMAND" in
  status) eco bus status --bus "$BUS" ;;
  forget)
    [ ${#POSITIONAL[@]} -eq 1 ] || die "forget needs the consumer name, as status shows it"
    eco bus forget --bus "$BUS" "${POSITIONAL[0]}" ;;
  drill) drill ;;
  *) usage; exit 2 ;;
esac
