#!/usr/bin/env bash
# RSS of `fifo-executor serve` (release build) holding N idle actions, each of which ran one
# execution to completion, measured as a new user would: a vhost and database of its own, the
# repository's own producer (`submit --spread`) and worker, the Postgres ledger on.
#
#   scripts/idle_actions_rss.sh [N=100000] [PASSIVATE_AFTER_SECONDS=60]
#
# Prints VmRSS once every execution has completed (idle, before the actors retire) and once
# every action's actor has retired (`actors_retired` in /api/v1/overview equals N).
# PASSIVATE_AFTER_SECONDS 0 never retires: the second figure is then not taken.
# IDLE_RSS_METRICS=false runs with executor.queue.enable_metrics off; IDLE_RSS_SERVE_ENV="K=V …"
# sets environment variables for serve alone (LD_PRELOAD of another allocator, say).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/common.sh
source scripts/common.sh

n=${1:-100000}
after=${2:-60}
bin=${FIFO_EXECUTOR_BIN:-${CARGO_TARGET_DIR:-target}/release/fifo-executor}
[[ -x $bin ]] || die "no release binary at $bin (cargo build --release, or set FIFO_EXECUTOR_BIN)"

tag="idle_rss_$$"
port=$((20000 + $$ % 20000))
work=$(mktemp -d)
serve_pid=""
worker_pid=""
cleanup() {
    [[ -n $worker_pid ]] && kill "$worker_pid" 2>/dev/null || true
    [[ -n $serve_pid ]] && kill "$serve_pid" 2>/dev/null && wait "$serve_pid" 2>/dev/null || true
    rabbitmqctl -q delete_vhost "$tag" >/dev/null 2>&1 || true
    psql -q -d postgres -U postgres -h 127.0.0.1 -c "DROP DATABASE IF EXISTS $tag" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

rabbitmqctl -q add_vhost "$tag" >/dev/null
rabbitmqctl -q set_permissions -p "$tag" guest '.*' '.*' '.*' >/dev/null
psql -q -d postgres -U postgres -h 127.0.0.1 -c "CREATE DATABASE $tag" >/dev/null

cat >"$work/config.yaml" <<EOF
executor:
  queue:
    passivate_after_seconds: $after
    enable_metrics: ${IDLE_RSS_METRICS:-true}
rabbitmq:
  url: "amqp://guest:guest@127.0.0.1:5672/$tag"
database:
  url: "postgres://postgres@127.0.0.1:5432/$tag"
api:
  listen: "127.0.0.1:$port"
EOF

rss_mb() { awk '/^VmRSS:/ {printf "%.1f", $2 / 1024}' "/proc/$serve_pid/status"; }
overview() { curl -fsS "http://127.0.0.1:$port/api/v1/overview"; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['data']['totals']['$1'])"; }
completed() {
    psql -qAt -d "$tag" -U postgres -h 127.0.0.1 \
        -c "SELECT count(*) FROM attune.execution WHERE status = 'succeeded'"
}

env ${IDLE_RSS_SERVE_ENV:-} "$bin" serve --config "$work/config.yaml" >"$work/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 300); do
    curl -fsS "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break
    kill -0 "$serve_pid" 2>/dev/null || { cat "$work/serve.log" >&2; die "serve exited"; }
    sleep 0.2
done
echo "serve pid $serve_pid ready: RSS $(rss_mb) MB"

"$bin" worker --config "$work/config.yaml" --actions '#' --concurrency 1000 --duration-ms 0 >"$work/worker.log" 2>&1 &
worker_pid=$!
sleep 1
start=$(date +%s)
"$bin" submit --config "$work/config.yaml" --action idle.rss --count "$n" --spread "$n"
until [[ $(completed) -ge $n ]]; do sleep 2; done
echo "all $n completed after $(($(date +%s) - start)) s: RSS $(rss_mb) MB (peak $(awk '/^VmHWM:/ {printf "%.1f", $2 / 1024}' "/proc/$serve_pid/status") MB)"
echo "overview: awake $(overview | field actors_awake), retired $(overview | field actors_retired)"
if ((after > 0)); then
    until [[ $(overview | field actors_retired) -ge $n ]]; do sleep 2; done
    echo "all $n retired after $(($(date +%s) - start)) s: RSS $(rss_mb) MB"
    sleep 10
    echo "10 s later: RSS $(rss_mb) MB"
fi
