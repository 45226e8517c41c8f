#!/usr/bin/env bash
# Issue 17's restart target: with 1,000,000 executions queued over 1,000 actions, how long
# after a kill -9 and a start does the executor dispatch again?
#
# Uses a vhost and a database of its own (restart1m), the release binary, default config
# (ledger on, limit 1 per action), and the local RabbitMQ and Postgres. Prints the seconds from
# the new process's start to /ready and to its first dispatch of an execution that was waiting.
#   ACTIONS=1000 PER_ACTION=1000 scripts/restart-1m.sh
# REUSE=1 keeps the vhost and database of the previous run (its executions still queued) and
# only starts, kills and starts the executor again: another figure without the submitting.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/fifo-executor-target}
ACTIONS=${ACTIONS:-1000}
PER_ACTION=${PER_ACTION:-1000}
PORT=${PORT:-18091}
NAME=restart1m
BIN=$CARGO_TARGET_DIR/release/fifo-executor
WORK=$(mktemp -d /tmp/restart1m.XXXXXX)
TOTAL=$((ACTIONS * PER_ACTION))

cargo build --release --quiet --bin fifo-executor

if [[ -z ${REUSE:-} ]]; then
    rabbitmqctl -q delete_vhost "$NAME" >/dev/null 2>&1 || true
    rabbitmqctl -q add_vhost "$NAME"
    rabbitmqctl -q set_permissions -p "$NAME" guest '.*' '.*' '.*'
    psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $NAME" -c "CREATE DATABASE $NAME"
fi

export ATTUNE__RABBITMQ__URL="amqp://guest:guest@127.0.0.1:5672/$NAME"
export ATTUNE__DATABASE__URL="postgres://postgres@127.0.0.1:5432/$NAME"
export ATTUNE__API__LISTEN="127.0.0.1:$PORT"
export ATTUNE__HEALTH__ENABLED=false
export ATTUNE__PURGE__ENABLED=false

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
sql() { psql -qtA -h 127.0.0.1 -U postgres -d "$NAME" -c "$1"; }
wait_ready() {
    until curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null; do sleep 0.05; done
}
cleanup() {
    [[ -n ${SERVE:-} ]] && kill -9 "$SERVE" 2>/dev/null || true
    [[ -n ${WORKER:-} ]] && kill "$WORKER" 2>/dev/null || true
}
trap cleanup EXIT

"$BIN" serve >"$WORK/serve-1.log" 2>&1 &
SERVE=$!
wait_ready
if [[ -z ${REUSE:-} ]]; then
    # A worker queue for every action, left without a consumer until the restart: the first
    # dispatch of each action waits in it.
    "$BIN" worker --concurrency 1 --duration-ms 3600000 >"$WORK/worker-0.log" 2>&1 &
    WORKER=$!
    sleep 2
    kill "$WORKER"
    WORKER=
    PARAMS=$(printf '{"payload":"%s"}' "$(head -c 49 /dev/zero | tr '\0' x)")
    echo "submitting $TOTAL executions over $ACTIONS actions (parameters ${#PARAMS} bytes)"
    start=$(now)
    seq 1 "$ACTIONS" | xargs -P 4 -I{} "$BIN" submit --action "restart1m.a{}" \
        --count "$PER_ACTION" --parameters "$PARAMS" >/dev/null
    until [[ $(sql "SELECT count(*) FROM attune.execution") -ge $TOTAL ]]; do sleep 1; done
    echo "accepted into the ledger in $(since "$start") s"
fi
sleep 2
echo "waiting: $(sql "SELECT count(*) FROM attune.execution WHERE status IN ('requested', 'scheduled')")," \
    "running: $(sql "SELECT count(*) FROM attune.execution WHERE status = 'running'")"

kill -9 "$SERVE"
wait "$SERVE" 2>/dev/null || true
t0=$(now)
t0_sql=$(sql "SELECT now()")
"$BIN" serve >"$WORK/serve-2.log" 2>&1 &
SERVE=$!
# Takes the dispatches that wait in the worker queue at once; their completions free the slots.
"$BIN" worker --concurrency 100 --duration-ms 0 >"$WORK/worker-1.log" 2>&1 &
WORKER=$!
wait_ready
ready=$(since "$t0")
# dispatched_at is the core's clock at admission; a later one than the start was waiting.
until [[ $(sql "SELECT count(*) FROM attune.execution WHERE dispatched_at > '$t0_sql'") -gt 0 ]]; do
    sleep 0.05
done
first=$(sql "SELECT round(extract(epoch FROM min(dispatched_at) - '$t0_sql'::timestamptz), 2)
             FROM attune.execution WHERE dispatched_at > '$t0_sql'")
rss=$(awk '/VmRSS/ { print $2 }' "/proc/$SERVE/status")
echo "after kill -9 and start: /ready in ${ready} s, first dispatch of a waiting execution" \
    "${first:-?} s after the start (RSS ${rss} kB, load average $(cut -d' ' -f1 /proc/loadavg))"
grep -o 'slow statement.*elapsed_secs[^ ]*' "$WORK/serve-2.log" | sed 's/db.statement.*elapsed=/… elapsed=/' || true
echo "logs in $WORK"
