#!/usr/bin/env bash
# Runs every test (unit, integration, and benches and examples in test mode) against the local
# RabbitMQ and PostgreSQL, starting them first if needed, after checking the Prometheus alert
# rules and the Grafana dashboard with promtool (scripts/promtool.sh), giving both services
# a certificate from a test CA for the TLS tests (scripts/tls.sh; restarts RabbitMQ once, the
# first time), and installing Debian's Chromium and ChromeDriver for the operations page's
# browser tests. Arguments go on to `cargo test`:
#   scripts/test.sh topology                              # only tests whose name has "topology"
#   scripts/test.sh --test rabbit_topology -- --nocapture
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/common.sh
source scripts/common.sh

ensure_cargo
scripts/services.sh
scripts/tls.sh
scripts/promtool.sh
ensure_chromium
exec cargo test --all-targets "$@"
