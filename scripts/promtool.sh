#!/usr/bin/env bash
# Checks the Prometheus alert rules and the Grafana dashboard's queries with promtool:
#   promtool check rules config/prometheus/alerts.yml          (syntax and PromQL)
#   promtool test rules  config/prometheus/alerts.test.yml     (the rules' unit tests)
#   every query of config/grafana/fifo-executor.json parses as PromQL
# Installs promtool (Debian's `prometheus` package) and jq when missing; needs root (or
# password-less sudo) only then. Idempotent and quiet when all is well; scripts/test.sh runs it.
#
# Note: on a machine that runs systemd, installing Debian's `prometheus` package also enables
# and starts a Prometheus server on :9090 (`systemctl disable --now prometheus` stops it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/common.sh
source scripts/common.sh

install_missing() {
    local missing=()
    command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
    command -v jq >/dev/null 2>&1 || missing+=(jq)
    ((${#missing[@]} > 0)) || return 0
    quietly as_root env DEBIAN_FRONTEND=noninteractive apt-get update
    quietly as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

# Writes each dashboard query as a recording rule, so `promtool check rules` parses it.
dashboard_queries_as_rules() {
    printf 'groups:\n  - name: grafana_dashboard_queries\n    rules:\n'
    jq -r '.. | objects | select(has("expr")) | .expr' config/grafana/fifo-executor.json |
        jq -R -r 'tojson' |
        awk '{ printf "      - record: dashboard:query:%d\n        expr: %s\n", NR, $0 }'
}

install_missing
quietly promtool check rules config/prometheus/alerts.yml
quietly promtool test rules config/prometheus/alerts.test.yml
jq empty config/grafana/fifo-executor.json || die "config/grafana/fifo-executor.json is not valid JSON"
rules=$(mktemp --suffix=.yml)
trap 'rm -f "$rules"' EXIT
dashboard_queries_as_rules >"$rules"
quietly promtool check rules "$rules"
