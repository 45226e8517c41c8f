#!/usr/bin/env bash
# Runs the executor (release build) with config/default.yaml against the local RabbitMQ and
# PostgreSQL, starting them first if needed. Arguments go on to `fifo-executor serve`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/common.sh
source scripts/common.sh

ensure_cargo
scripts/services.sh
exec cargo run --release --bin fifo-executor -- serve --config config/default.yaml "$@"
