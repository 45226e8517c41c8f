#!/usr/bin/env bash
# Gives the local RabbitMQ and PostgreSQL a certificate from a certificate authority of the
# project's own, for the TLS tests (tests/tls.rs), and leaves everything else as it was:
#   RabbitMQ    a TLS listener on 127.0.0.1:5671 beside the plain one on 5672; it asks each
#               client for a certificate and refuses one the CA did not sign, but lets a
#               client without one in (guest still logs in with its password)
#   PostgreSQL  ssl = on with the CA's server certificate (plain connections still accepted)
# The CA, the certificates and a second "rogue" CA the tests use to prove that a wrong
# certificate is refused are made once, in $FIFO_EXECUTOR_TLS_DIR (default
# /var/tmp/fifo-executor-tls), valid for 825 days, for the names localhost and 127.0.0.1.
# Safe to run any number of times: once set up it only checks, in about a second. Setting
# the listener up restarts RabbitMQ once (a TLS listener cannot be added to a running node's
# configuration); PostgreSQL only reloads. Needs root (or password-less sudo) the first time.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
export PATH="$PATH:/usr/sbin:/sbin"

readonly TLS_DIR=${FIFO_EXECUTOR_TLS_DIR:-/var/tmp/fifo-executor-tls}
readonly RABBIT_CONF=/etc/rabbitmq/rabbitmq.conf
readonly RABBIT_TLS_DIR=/etc/rabbitmq/fifo-executor-tls
readonly MARKER="# fifo-executor scripts/tls.sh: the TLS listener of the TLS tests"

command -v openssl >/dev/null 2>&1 || {
    quietly as_root env DEBIAN_FRONTEND=noninteractive apt-get update
    quietly as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y openssl
}

# make_ca NAME: a self-signed CA, NAME.pem and NAME.key.
make_ca() {
    local name=$1
    openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=fifo-executor test $name" \
        -keyout "$name.key" -out "$name.pem" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
}

# make_leaf NAME CA USAGE: NAME.pem and NAME.key (PKCS#8) signed by CA, for serverAuth or
# clientAuth, valid for localhost and 127.0.0.1.
make_leaf() {
    local name=$1 ca=$2 usage=$3
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$name" -keyout "$name.key" -out "$name.csr"
    printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "extendedKeyUsage=$usage" \
        "basicConstraints=CA:FALSE" >"$name.ext"
    openssl x509 -req -in "$name.csr" -CA "$ca.pem" -CAkey "$ca.key" -CAcreateserial \
        -days 825 -extfile "$name.ext" -out "$name.pem"
    rm -f "$name.csr" "$name.ext"
}

make_certificates() {
    [[ -s $TLS_DIR/ca.pem && -s $TLS_DIR/rogue-client.key ]] && return 0
    local work
    work=$(mktemp -d)
    (
        cd "$work"
        make_ca ca
        make_ca rogue-ca
        make_leaf server ca serverAuth
        make_leaf client ca clientAuth
        make_leaf rogue-client rogue-ca clientAuth
        make_leaf rogue-server rogue-ca serverAuth
    ) >/dev/null 2>&1 || die "openssl could not make the test certificates (in $work)"
    mkdir -p "$TLS_DIR"
    cp "$work"/*.pem "$work"/*.key "$TLS_DIR"/
    chmod 0644 "$TLS_DIR"/*.pem
    chmod 0600 "$TLS_DIR"/*.key
    rm -rf "$work"
}

# install_for OWNER DIR: the CA and the server's certificate and key, for a service running
# as OWNER, which must be able to read its key and nobody else.
install_for() {
    local owner=$1 dir=$2
    as_root mkdir -p "$dir"
    as_root cp "$TLS_DIR/ca.pem" "$TLS_DIR/server.pem" "$TLS_DIR/server.key" "$dir"/
    as_root chown -R "$owner:$owner" "$dir"
    as_root chmod 0600 "$dir/server.key"
}

listening_on() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

ensure_rabbitmq_tls() {
    install_for rabbitmq "$RABBIT_TLS_DIR"
    if ! grep -qF "$MARKER" "$RABBIT_CONF" 2>/dev/null; then
        printf '%s\n' "$MARKER" \
            "listeners.ssl.local = 127.0.0.1:5671" \
            "ssl_options.cacertfile = $RABBIT_TLS_DIR/ca.pem" \
            "ssl_options.certfile = $RABBIT_TLS_DIR/server.pem" \
            "ssl_options.keyfile = $RABBIT_TLS_DIR/server.key" \
            "ssl_options.verify = verify_peer" \
            "ssl_options.fail_if_no_peer_cert = false" | as_root tee -a "$RABBIT_CONF" >/dev/null
    fi
    listening_on 5671 && return 0
    echo "restarting RabbitMQ once, for its TLS listener on 127.0.0.1:5671…"
    if rabbitmqctl -q ping >/dev/null 2>&1; then
        quietly as_root rabbitmqctl -q stop
    fi
    # services.sh starts the node again and waits until guest can log in.
    "$(dirname "${BASH_SOURCE[0]}")/services.sh"
    local end=$((SECONDS + 30))
    until listening_on 5671; do
        ((SECONDS < end)) || die "RabbitMQ runs but nothing listens on 127.0.0.1:5671" \
            "(see /var/log/rabbitmq/ and $RABBIT_CONF)"
        sleep 0.5
    done
}

psql_tcp() {
    psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -w -X -q -At -v ON_ERROR_STOP=1 "$@"
}

ensure_postgres_tls() {
    local data_dir pg_dir
    data_dir=$(psql_tcp -c 'show data_directory')
    pg_dir="$data_dir/fifo-executor-tls"
    if [[ $(psql_tcp -c 'show ssl_cert_file') == "$pg_dir/server.pem" &&
        $(psql_tcp -c 'show ssl') == on ]] && as_root cmp -s "$TLS_DIR/server.pem" "$pg_dir/server.pem"; then
        return 0
    fi
    install_for postgres "$pg_dir"
    psql_tcp -c "alter system set ssl_cert_file = '$pg_dir/server.pem'" \
        -c "alter system set ssl_key_file = '$pg_dir/server.key'" \
        -c "alter system set ssl_ca_file = '$pg_dir/ca.pem'" \
        -c "alter system set ssl = on" \
        -c "select pg_reload_conf()" >/dev/null
    local end=$((SECONDS + 10))
    until [[ $(psql_tcp -c 'show ssl_cert_file') == "$pg_dir/server.pem" ]]; do
        ((SECONDS < end)) || die "PostgreSQL did not take its TLS settings (see its log)"
        sleep 0.2
    done
}

"$(dirname "${BASH_SOURCE[0]}")/services.sh"
make_certificates
ensure_rabbitmq_tls
ensure_postgres_tls
