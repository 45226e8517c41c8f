//! TLS to both services, against the local RabbitMQ and PostgreSQL as `scripts/tls.sh` sets
//! them up (the README's test command runs it first): a TLS listener on 127.0.0.1:5671 that
//! checks a client certificate when one is shown, PostgreSQL with `ssl = on`, both with
//! certificates from the project's test CA in `FIFO_EXECUTOR_TLS_DIR`
//! (`/var/tmp/fifo-executor-tls` by default), where a second, rogue CA's certificates are too.
//!
//! - `amqps://` with `rabbitmq.tls.ca_file` connects, and the broker sees a TLS connection;
//!   trusting the system's roots or the rogue CA instead, the executor refuses the broker;
//! - a client certificate from the CA is what the broker sees; one from the rogue CA is refused;
//! - `sslmode=verify-full&sslrootcert=` connects over TLS, and refuses a server the given CA
//!   did not sign;
//! - `fifo-executor serve` with both runs executions end to end, every connection it makes
//!   being TLS.

mod common_pg;
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common_pg::{TestDb, until_ended};
use fifo_executor::config::RabbitTlsConfig;
use fifo_executor::http::client::Client;
use fifo_executor::rabbit::{connect_tls, topology};
use serde_json::json;
use support::serve::{Dir, free_port, log_of, serve, stop};
use support::{TestVhost, all_dispatches_queue, publish_json, topology_channel};

const DEADLINE: Duration = Duration::from_secs(60);

/// The directory `scripts/tls.sh` fills; a test run without it fails saying so.
fn tls_dir() -> PathBuf {
    let dir = std::env::var_os("FIFO_EXECUTOR_TLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/fifo-executor-tls"));
    assert!(
        dir.join("ca.pem").is_file() && dir.join("rogue-client.key").is_file(),
        "{} lacks the test certificates: run scripts/tls.sh (scripts/test.sh does)",
        dir.display()
    );
    dir
}

fn amqps_url(vhost: &TestVhost) -> String {
    format!("amqps://guest:guest@127.0.0.1:5671/{}", vhost.name)
}

fn tls_files(dir: &Path, ca: &str, client: Option<&str>) -> RabbitTlsConfig {
    RabbitTlsConfig {
        ca_file: Some(dir.join(format!("{ca}.pem"))),
        client_cert_file: client.map(|c| dir.join(format!("{c}.pem"))),
        client_key_file: client.map(|c| dir.join(format!("{c}.key"))),
    }
}

/// `(port, ssl, peer_cert_subject)` of every connection to `vhost`, as the broker lists them.
async fn broker_connections(vhost: &TestVhost) -> Vec<(String, String, String)> {
    let listed = support::rabbitmqctl(&[
        "list_connections",
        "vhost",
        "port",
        "ssl",
        "peer_cert_subject",
    ])
    .await;
    listed
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() == 4 && f[0] == vhost.name)
                .then(|| (f[1].to_owned(), f[2].to_owned(), f[3].to_owned()))
        })
        .collect()
}

#[tokio::test]
async fn amqps_trusts_the_ca_file_and_refuses_a_broker_it_did_not_sign() {
    let dir = tls_dir();
    let vhost = TestVhost::create().await;
    let url = amqps_url(&vhost);

    let conn = connect_tls(&url, &tls_files(&dir, "ca", None), "tls test")
        .await
        .expect("amqps with the CA file connects");
    conn.create_channel().await.expect("a channel over TLS");
    let seen = broker_connections(&vhost).await;
    assert!(
        seen.iter()
            .any(|(port, ssl, _)| port == "5671" && ssl == "true"),
        "the broker lists no TLS connection on 5671: {seen:?}"
    );
    conn.close(200, "done".into()).await.expect("closes");

    // The system's roots alone, or the wrong CA: the handshake fails on the client's side.
    let system_only = connect_tls(&url, &RabbitTlsConfig::default(), "tls test").await;
    assert!(
        system_only.is_err(),
        "connected trusting only the system's roots"
    );
    let rogue = connect_tls(&url, &tls_files(&dir, "rogue-ca", None), "tls test").await;
    let error = rogue.expect_err("the rogue CA does not vouch for the broker");
    assert!(
        format!("{error:?}").to_lowercase().contains("certificate"),
        "{error:?}"
    );
    // A CA file that is not there is named.
    let missing = RabbitTlsConfig {
        ca_file: Some(dir.join("no-such-ca.pem")),
        ..RabbitTlsConfig::default()
    };
    let error = connect_tls(&url, &missing, "tls test")
        .await
        .expect_err("no CA file");
    assert!(error.to_string().contains("no-such-ca.pem"), "{error}");
}

#[tokio::test]
async fn the_broker_sees_the_client_certificate_and_refuses_a_rogue_one() {
    let dir = tls_dir();
    let vhost = TestVhost::create().await;
    let url = amqps_url(&vhost);

    let conn = connect_tls(&url, &tls_files(&dir, "ca", Some("client")), "tls test")
        .await
        .expect("a client certificate from the CA is accepted");
    conn.create_channel().await.expect("a channel");
    let seen = broker_connections(&vhost).await;
    assert!(
        seen.iter()
            .any(|(_, ssl, subject)| ssl == "true" && subject.contains("CN=client")),
        "the broker did not see the client certificate: {seen:?}"
    );
    conn.close(200, "done".into()).await.expect("closes");

    // The broker verifies what it is shown (ssl_options.verify = verify_peer): with TLS 1.3
    // the client learns of the refusal at its first read, so connecting fails either way.
    let rogue = connect_tls(
        &url,
        &tls_files(&dir, "ca", Some("rogue-client")),
        "tls test",
    )
    .await;
    assert!(
        rogue.is_err(),
        "a client certificate the CA did not sign was let in"
    );
}

fn pg_url(db: &str, query: &str) -> String {
    format!("postgres://postgres@127.0.0.1:5432/{db}?{query}")
}

async fn ssl_in_use(url: &str) -> Result<bool, String> {
    let pool = fifo_executor::db::connect_lazy(url, 1).map_err(|e| e.to_string())?;
    let ssl =
        sqlx::query_scalar::<_, bool>("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .map_err(|e| e.to_string());
    pool.close().await;
    ssl
}

#[tokio::test]
async fn postgres_verify_full_connects_over_tls_only_to_a_server_the_ca_signed() {
    let dir = tls_dir();
    let ca = dir.join("ca.pem");
    let rogue = dir.join("rogue-ca.pem");
    for host_query in [
        format!("sslmode=verify-full&sslrootcert={}", ca.display()),
        format!("sslmode=verify-ca&sslrootcert={}", ca.display()),
    ] {
        assert_eq!(
            ssl_in_use(&pg_url("postgres", &host_query)).await,
            Ok(true),
            "{host_query}"
        );
    }
    // Verified for the name used too: localhost is on the certificate as well.
    let by_name = format!(
        "postgres://postgres@localhost:5432/postgres?sslmode=verify-full&sslrootcert={}",
        ca.display()
    );
    assert_eq!(ssl_in_use(&by_name).await, Ok(true));

    let refused = ssl_in_use(&pg_url(
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={}", rogue.display()),
    ))
    .await;
    assert!(
        refused.is_err(),
        "verify-full accepted a server the CA did not sign"
    );
    let unknown = ssl_in_use(&pg_url("postgres", "sslmode=verify-full")).await;
    assert!(
        unknown.is_err(),
        "the system's roots vouched for the test CA's server"
    );
}

#[tokio::test]
async fn serve_runs_executions_with_every_connection_over_tls() {
    let dir = tls_dir();
    let vhost = TestVhost::create().await;
    let db = TestDb::new().await;
    let scratch = Dir::new("tls");
    let port = free_port();
    let pg = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        db.url,
        dir.join("ca.pem").display()
    );
    let yaml = format!(
        "rabbitmq:\n  url: \"{amqps}\"\n  tls:\n    ca_file: {ca}\n    client_cert_file: {cert}\n    \
         client_key_file: {key}\n\
         database:\n  url: \"{pg}\"\n\
         executor:\n  shutdown_timeout_seconds: 5\n\
         policies:\n  default:\n    concurrency_limit: 2\n\
         api:\n  listen: \"127.0.0.1:{port}\"\n",
        amqps = amqps_url(&vhost),
        ca = dir.join("ca.pem").display(),
        cert = dir.join("client.pem").display(),
        key = dir.join("client.key").display(),
    );
    let config = scratch.0.join("config.yaml");
    std::fs::write(&config, yaml).expect("writes the config");
    let mut child = serve(&scratch.0, &config, None);
    let log_text = || log_of(&scratch.0);

    let client = Client::for_listen_address(([127, 0, 0, 1], port).into())
        .with_timeout(Duration::from_secs(5));
    let started = tokio::time::Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("serve exited with {status}:\n{}", log_text());
        }
        if client
            .request("GET", "/ready", None)
            .await
            .is_ok_and(|r| r.status == 200)
        {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "not ready in {DEADLINE:?}:\n{}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A producer and a worker on the plain listener of the same vhost.
    let (_conn, ch) = topology_channel(&vhost).await;
    all_dispatches_queue(&ch, "tls-worker").await;
    const N: u64 = 20;
    for id in 1..=N {
        let body = json!({"execution_id": id, "action_ref": "tls.echo", "parameters": {"n": id}});
        publish_json(&ch, topology::REQUESTED_ROUTING_KEY, &body).await;
    }
    let mut dispatched = Vec::new();
    while dispatched.len() < N as usize {
        assert!(
            started.elapsed() < DEADLINE * 2,
            "{} of {N} dispatched:\n{}",
            dispatched.len(),
            log_text()
        );
        match ch
            .basic_get(
                "tls-worker".into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic.get")
        {
            Some(m) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&m.delivery.data).expect("a dispatch");
                let id = v["execution_id"].as_u64().expect("an id");
                dispatched.push(id);
                let done = json!({"execution_id": id, "status": "succeeded"});
                publish_json(&ch, topology::COMPLETED_ROUTING_KEY, &done).await;
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert_eq!(dispatched, (1..=N).collect::<Vec<_>>(), "FIFO over TLS");
    assert!(
        until_ended(&db.pool, N as usize, DEADLINE).await,
        "not every execution ended in the ledger:\n{}",
        log_text()
    );

    // Every connection the service holds is TLS: to the broker (with its certificate) and to
    // Postgres.
    let executor_side: Vec<_> = broker_connections(&vhost)
        .await
        .into_iter()
        .filter(|(port, _, _)| port == "5671")
        .collect();
    assert!(
        !executor_side.is_empty(),
        "the executor has no connection on 5671"
    );
    assert!(
        executor_side
            .iter()
            .all(|(_, ssl, subject)| ssl == "true" && subject.contains("CN=client")),
        "{executor_side:?}"
    );
    // The service's Postgres sessions (the test's own pool is told apart by its name).
    let (sessions, all_tls): (i64, Option<bool>) = sqlx::query_as(
        "SELECT count(*), bool_and(s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.datname = $1 AND a.application_name = 'fifo-executor'",
    )
    .bind(&db.name)
    .fetch_one(&db.pool)
    .await
    .expect("pg_stat_ssl");
    assert!(sessions > 0, "the service holds no session in {}", db.name);
    assert_eq!(all_tls, Some(true), "a session of the service without TLS");

    stop(&mut child, &scratch.0, DEADLINE).await;
    let text = log_text();
    assert!(
        !text.contains("guest:guest"),
        "a password in the log:\n{text}"
    );
}
