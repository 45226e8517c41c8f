#!/usr/bin/env bash
# Makes sure the local services the tests and scripts/run.sh use are installed, running and
# reachable the way config/default.yaml expects them:
#   RabbitMQ    amqp://guest:guest@127.0.0.1:5672/%2f
#   PostgreSQL  postgres://postgres@127.0.0.1:5432/fifo_executor (trust auth over local TCP)
# and that cargo is there. Safe to run any number of times; silent when all is well, and then
# quick (the checks cost about one second, most of it rabbitmqctl starting its Erlang VM).
# Installing or repairing anything needs root (or password-less sudo).
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

readonly DB_NAME=fifo_executor
readonly DEADLINE_SECONDS=${SERVICES_DEADLINE_SECONDS:-60}
# rabbitmqctl and rabbitmq-server live in /usr/sbin, which a non-root PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

# wait_until SECONDS WHAT COMMAND...: retries COMMAND until it succeeds or SECONDS have passed.
wait_until() {
    local seconds=$1 what=$2
    shift 2
    local end=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || die "$what did not answer within ${seconds}s (last check: $*)"
        sleep 0.5
    done
}

install_missing_packages() {
    local missing=()
    if ! command -v rabbitmq-server >/dev/null 2>&1 || ! command -v rabbitmqctl >/dev/null 2>&1; then
        missing+=(rabbitmq-server)
    fi
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! command -v psql >/dev/null 2>&1 ||
        ! compgen -G '/etc/postgresql/*/main' >/dev/null; then
        missing+=(postgresql)
    fi
    ((${#missing[@]} > 0)) || return 0
    quietly as_root env DEBIAN_FRONTEND=noninteractive apt-get update
    quietly as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
}

psql_tcp() {
    psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -w -X -q -At -v ON_ERROR_STOP=1 "$@"
}

ensure_postgres() {
    local clusters version hba db_count error pg_logs
    # The first (normally the only) installed major version, as `ls /etc/postgresql | head -1`.
    clusters=(/etc/postgresql/*/main)
    version=$(basename "$(dirname "${clusters[0]}")")
    hba=/etc/postgresql/$version/main/pg_hba.conf
    pg_logs="/var/log/postgresql/postgresql-$version-main.log"

    if ! pg_isready -q -h 127.0.0.1 -p 5432; then
        if ! pg_ctlcluster "$version" main status >/dev/null 2>&1; then
            quietly as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
        fi
        wait_until "$DEADLINE_SECONDS" "PostgreSQL on 127.0.0.1:5432 (see $pg_logs)" \
            pg_isready -q -h 127.0.0.1 -p 5432
    fi

    if ! error=$(psql_tcp -c 'select 1' 2>&1 >/dev/null); then
        # A fresh Debian cluster asks for a password over TCP; the project's URLs carry none.
        case $error in
        *password* | *pg_hba.conf* | *authentication*) ;;
        *) die "cannot connect to PostgreSQL as postgres on 127.0.0.1: $error" ;;
        esac
        local marker="# added by fifo-executor scripts/services.sh: trust local TCP for postgres"
        if ! grep -qF "$marker" "$hba"; then
            # Prepended, because the first matching line of pg_hba.conf wins.
            local updated
            updated=$(printf '%s\n' "$marker" \
                'host all postgres 127.0.0.1/32 trust' \
                'host all postgres ::1/128 trust' && cat "$hba")
            printf '%s\n' "$updated" | as_root tee "$hba" >/dev/null
            quietly as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
        fi
        wait_until 10 "PostgreSQL trust authentication for postgres on 127.0.0.1 (see $hba)" \
            psql_tcp -c 'select 1'
    fi

    db_count=$(psql_tcp -c "select count(*) from pg_database where datname = '$DB_NAME'")
    if [[ $db_count == 0 ]] && ! error=$(psql_tcp -c "create database $DB_NAME" 2>&1); then
        # Another run may have created it in the meantime.
        [[ $error == *"already exists"* ]] || die "cannot create database $DB_NAME: $error"
    fi
}

guest_can_log_in() {
    rabbitmqctl -q authenticate_user guest guest >/dev/null 2>&1
}

ensure_rabbitmq() {
    # One rabbitmqctl call proves the node is up, answers the CLI and knows guest/guest.
    guest_can_log_in && return 0

    if ! rabbitmqctl -q ping >/dev/null 2>&1; then
        quietly as_root rabbitmq-server -detached
    else
        # The node is up but its app may be stopped (`rabbitmqctl stop_app`, as the broker
        # restart test does): start_app is a no-op when it already runs.
        quietly as_root rabbitmqctl -q start_app
    fi
    # await_startup fails at once while the new node is not registered yet, hence the retries.
    wait_until "$DEADLINE_SECONDS" "RabbitMQ (see /var/log/rabbitmq/)" \
        rabbitmqctl -q await_startup --timeout 10

    if ! guest_can_log_in; then
        if rabbitmqctl -q list_users | grep -q '^guest[[:space:]]'; then
            quietly as_root rabbitmqctl -q change_password guest guest
        else
            quietly as_root rabbitmqctl -q add_user guest guest
        fi
        quietly as_root rabbitmqctl -q set_user_tags guest administrator
    fi
    # guest only ever logs in over loopback (RabbitMQ's loopback_users default), which is all the
    # project needs; it does need the default vhost.
    quietly as_root rabbitmqctl -q set_permissions -p / guest '.*' '.*' '.*'
    guest_can_log_in || die "RabbitMQ is up but guest/guest cannot log in"
}

ensure_cargo
install_missing_packages
ensure_postgres
ensure_rabbitmq
